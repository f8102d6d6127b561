"""The access list: people, their face embeddings and the 1:N match (import from here, not from the modules).

records.py  Person, Schedule, enrollment records and name / schedule validation
index.py    the in-memory 1:N index, the match modes (best, top-k mean, centroid, blend), vector checks, thresholds
schema.py   the SQLite file format: schema, migrations, header checks
store.py    Gallery (one SQLite file, transactions) and open_gallery(cfg), the one factory
portable.py export / import files, re-embedding with another model
fleet_rows.py the rows edgeface.fleet writes (one transaction per batch of signed changes)
"""
from edgeface.gallery.index import (BLEND_CENTROID_WEIGHT, FALLBACK_MAX_DISTANCE, MATCH_MODES, MAX_COSINE_DISTANCE,
                                    blend_distances, default_max_distance, embedding_checksum, resolve_max_distance,
                                    vector_problem)
from edgeface.gallery.portable import EXPORT_FORMAT, EXPORT_VERSION
from edgeface.gallery.records import (Chip, EnrollItem, EnrollReport, Person, Schedule, image_sha256, validate_name,
                                      validate_schedule)
from edgeface.gallery.schema import MIGRATIONS, SCHEMA_VERSION
from edgeface.gallery.store import Gallery, analyzer_model, embedder_identity, gallery_path, open_gallery

__all__ = ["Gallery", "open_gallery", "gallery_path", "embedder_identity", "analyzer_model", "Person", "Schedule",
           "Chip", "EnrollItem", "EnrollReport", "validate_name", "validate_schedule", "image_sha256",
           "default_max_distance", "resolve_max_distance", "embedding_checksum", "vector_problem", "blend_distances",
           "MATCH_MODES", "BLEND_CENTROID_WEIGHT", "FALLBACK_MAX_DISTANCE", "MAX_COSINE_DISTANCE", "SCHEMA_VERSION",
           "MIGRATIONS", "EXPORT_FORMAT", "EXPORT_VERSION"]
