"""People management from the command line: enroll, identify, verify, people ..., gallery ....

Data goes to stdout (one line per answer, or JSON with --json); progress, warnings and messages go to
stderr, so `edgeface identify *.jpg > answers.csv` captures only answers.

identify prints one CSV line per face, face_recognition style: `image,name,distance`, where name is
`unknown` for a face nobody in the gallery is close enough to, and `no_face` (empty distance) for an
image without a face. Exit status: 0 when every image was read (whatever the answers), 1 when an
image could not be read (the others are still answered).
verify prints `image,name,distance` (name or `unknown`); exit 0 = the same person, 1 = not, 3 = no face.
"""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

import click

from edgeface.cli import CliContext, pass_ctx
from edgeface.config import EdgefaceConfig
from edgeface.enroll import QualityGate
from edgeface.errors import CameraError, ExitStatus, GalleryError, ImageError, NoFaceError
from edgeface.gallery import analyzer_model, gallery_path, open_gallery

UNKNOWN = "unknown"
NO_FACE = "no_face"
_GATE = QualityGate()


# ----------------------------------------------------------------------------------------------- helpers


def make_gallery_dirs(cfg: EdgefaceConfig) -> None:
    """Create the missing folders leading to the gallery file (state_dir among them, usually) as 0700 each, as the
    daemon wants them: mkdir(parents=True) made every level but the last 0755, so an enroll before the first
    `edgeface run` left a state folder others could list (the daemon tightened it later, with a warning)."""
    path = gallery_path(cfg)
    missing = []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise GalleryError(f"cannot create the gallery folder {folder}: {exc.strerror or exc}") from None


def make_analyzer(cfg: EdgefaceConfig):
    from edgeface.vision.analyzer import FaceAnalyzer

    return FaceAnalyzer.from_config(cfg.detector, cfg.embedder, cfg.models_dir)


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=None, leave=False)


def _warn(msg: str) -> None:
    click.echo(msg, err=True)


def _csv_line(*fields: Any) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(fields)
    return buf.getvalue()


def _expand_images(paths: Iterable[Path]) -> list[Path]:
    from edgeface.vision.images import list_images

    out: list[Path] = []
    for p in paths:
        out.extend(list_images(p) if p.is_dir() else [p])
    return out


def _report_enrollment(reports: list, as_json: bool) -> None:
    from edgeface.enroll import summary_line

    for r in reports:
        for src, why in r.rejected:
            _warn(f"rejected {src}: {why}")
        for w in r.warnings:
            _warn(f"warning: {w}")
        for src in r.duplicates:
            if not any(w.startswith(f"{src}:") for w in r.warnings):
                _warn(f"skipped {src}: already enrolled (same image)")
        _warn(summary_line(r))
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in reports], indent=2))


# ----------------------------------------------------------------------------------------------- enroll


@click.command("enroll")
@click.argument("name", required=False)
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--folder", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Enroll everyone in FOLDER/<name>/*.jpg (one person per subfolder), in one transaction.")
@click.option("--camera", is_flag=True, help="Capture NAME's photos from the configured camera.")
@click.option("--frames", "n_frames", type=click.IntRange(1, 50), default=5, show_default=True,
              help="With --camera: how many good frames to capture.")
@click.option("--max-frames", type=click.IntRange(1, 100000), default=300, show_default=True,
              help="With --camera: give up after this many frames.")
@click.option("--external-id", default=None, help="Your own id for the person (badge number, HA user...).")
@click.option("--min-face-size", type=click.FloatRange(20, 4000), default=_GATE.min_face_size, show_default=True,
              help="Quality gate: smallest face (box side, pixels).")
@click.option("--min-sharpness", type=click.FloatRange(0, None), default=_GATE.min_sharpness, show_default=True,
              help="Quality gate: variance of the Laplacian of the aligned face (real photos >= ~100).")
@click.option("--max-nose-offset", type=click.FloatRange(0, 0.5), default=_GATE.max_nose_offset, show_default=True,
              help="Quality gate: how far the nose may be off the middle of the eyes (0.5 = no frontal check).")
@click.option("--json", "as_json", is_flag=True, help="Print the enrollment report as JSON on stdout.")
@pass_ctx
def enroll_cmd(obj: CliContext, name: Optional[str], images: tuple[Path, ...], folder: Optional[Path], camera: bool,
               n_frames: int, max_frames: int, external_id: Optional[str], min_face_size: float,
               min_sharpness: float, max_nose_offset: float, as_json: bool) -> None:
    """Enroll NAME from IMAGE... (files or folders), from --camera, or everyone under --folder.

    Every photo passes a quality gate (one face, large enough, sharp, roughly frontal); rejected photos are
    listed with the reason. Nothing is written unless the whole enrollment succeeds."""
    from edgeface.enroll import capture_from_frames, enroll_images, scan_people_folder
    from edgeface.gallery import validate_name

    cfg = obj.config
    gate = QualityGate(min_face_size=min_face_size, min_sharpness=min_sharpness, max_nose_offset=max_nose_offset,
                       max_roll_deg=_GATE.max_roll_deg)
    if folder is not None:
        if name or images or camera:
            raise click.UsageError("--folder takes no NAME or IMAGE arguments (names are the subfolder names)")
        batches_paths = scan_people_folder(folder)
    else:
        if not name:
            raise click.UsageError("give NAME and IMAGE..., NAME --camera, or --folder DIR")
        validate_name(name)
        if camera and images:
            raise click.UsageError("give IMAGE... or --camera, not both")
        if not camera and not images:
            raise click.UsageError(f"no images given for {name!r} (or use --camera)")
        batches_paths = [] if camera else [(name, _expand_images(images))]
        if not camera and not batches_paths[0][1]:
            raise NoFaceError(f"no image files found in {', '.join(map(str, images))}")
    keep = cfg.gallery.keep_crops
    with make_analyzer(cfg) as analyzer:
        model = analyzer_model(analyzer)
        if gallery_path(cfg).exists():  # a foreign/other-model gallery fails now, not after all the photos
            open_gallery(cfg, model=model).close()
        if camera:
            from edgeface.frames import open_source

            trouble: list[str] = []

            def on_health(state: str, detail: str) -> None:
                # enrolling is interactive: a camera that fails to open or freezes ends it (the daemon retries)
                if state in ("reconnecting", "frozen", "stopped"):
                    trouble.append(f"{state}: {detail}")
                    source.close()

            source = open_source(cfg.camera, on_health=on_health)
            try:
                with _progress(n_frames, f"capturing {name}") as bar:
                    def on_item(item: Any) -> None:
                        if item.accepted:
                            bar.update(1)
                    items = capture_from_frames(analyzer, source.frames(), count=n_frames, max_frames=max_frames,
                                                gate=gate, keep_chips=keep, on_item=on_item)
            finally:
                source.close()
            good = sum(it.accepted for it in items)
            if not good:
                why = trouble[0] if trouble else f"no usable face in {len(items)} frames"
                raise CameraError(f"enroll --camera: camera.source {cfg.camera.source!r} gave no usable frame "
                                  f"({why}); nothing was written")
            if trouble and good < n_frames:
                _warn(f"warning: camera {trouble[0]}: enrolling the {good} good frame(s) captured before it")
            batches = [(name, items)]
        else:
            total = sum(len(p) for _, p in batches_paths)
            with _progress(total, "enrolling") as bar:
                batches = [(n, enroll_images(analyzer, paths, gate=gate, keep_chips=keep,
                                             progress=lambda: bar.update(1)))
                           for n, paths in batches_paths]
    make_gallery_dirs(cfg)
    with open_gallery(cfg, create=True, model=model) as gallery:
        reports = gallery.enroll_many(batches, external_id=external_id)
    _report_enrollment(reports, as_json)
    empty = [r.name for r in reports if not r.added]
    if empty:  # re-enrolling the same photos, or every new one rejected: say so and fail, a script must see it
        others = len(reports) - len(empty)
        _warn(f"error: nothing added for {', '.join(map(repr, empty))} (every photo rejected or already enrolled)"
              + (f"; the {others} other(s) were enrolled" if others else ""))
        raise click.exceptions.Exit(int(ExitStatus.NO_FACE))


# ----------------------------------------------------------------------------------------------- identify


def _annotate(rgb: Any, answers: list[tuple[Any, str, Optional[float]]], out: Path) -> None:
    import cv2

    from edgeface.vision.images import save_image

    img = rgb.copy()
    for face, label, dist in answers:
        x, y, w, h = (int(round(v)) for v in face.box)
        color = (0, 200, 0) if label != UNKNOWN else (220, 40, 40)
        cv2.rectangle(img, (x, y), (x + w, y + h), color, 2)
        text = label if dist is None else f"{label} {dist:.2f}"
        cv2.putText(img, text, (x, max(12, y - 6)), cv2.FONT_HERSHEY_SIMPLEX, 0.6, color, 2, cv2.LINE_AA)
    save_image(out, img)


@click.command("identify")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--annotate", "annotate_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write each image with boxes and names into this folder.")
@click.option("--json", "as_json", is_flag=True,
              help="JSON on stdout instead of CSV lines: one entry per image, in order, with its faces and its error "
                   "(null when it was read).")
@pass_ctx
def identify_cmd(obj: CliContext, images: tuple[Path, ...], annotate_dir: Optional[Path], as_json: bool) -> int:
    """Who is in IMAGE...? One line per face: image,name,distance (name 'unknown' or 'no_face').

    Exit 0 when every image was read, 1 when some image could not be read (the rest are still answered)."""
    from edgeface.vision.images import load_image

    cfg = obj.config
    paths = _expand_images(images)
    if annotate_dir is not None:
        annotate_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    rows: list[dict] = []
    with make_analyzer(cfg) as analyzer, open_gallery(cfg, model=analyzer_model(analyzer), read_only=True) as gallery:
        people = gallery.people()
        if not any(p.enabled and p.n_embeddings for p in people):
            _warn(f"warning: gallery {gallery.path} has nobody enabled with {gallery.model_id} embeddings "
                  f"({len(people)} people in it): every face will be '{UNKNOWN}'")
        for path in paths:
            try:
                rgb = load_image(path)
            except ImageError as exc:
                _warn(f"error: {exc}")
                failed += 1
                rows.append({"image": str(path), "faces": [], "error": str(exc)})  # every input gets its entry
                continue
            results = analyzer.analyze(rgb)
            answers = []
            faces_out = []
            if not results:
                if not as_json:
                    click.echo(_csv_line(path, NO_FACE, ""))
            for res in results:
                m = gallery.match(res.embedding)
                label = m.name if m.known else UNKNOWN
                answers.append((res.face, label, m.distance))
                faces_out.append({"name": m.name, "distance": round(m.distance, 4), "threshold": m.threshold,
                                  "candidate": m.candidate_name, "box": res.face.as_dict()["box"]})
                if not as_json:
                    click.echo(_csv_line(path, label, f"{m.distance:.3f}"))
            rows.append({"image": str(path), "faces": faces_out, "error": None})
            if annotate_dir is not None:
                _annotate(rgb, answers, annotate_dir / (path.stem + ".jpg"))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    return int(ExitStatus.ERROR) if failed else int(ExitStatus.OK)


@click.command("verify")
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--person", required=True, help="The enrolled person the image should show.")
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout.")
@pass_ctx
def verify_cmd(obj: CliContext, image: Path, person: str, as_json: bool) -> int:
    """Is the main face of IMAGE the enrolled PERSON? Exit 0 yes, 1 no, 3 no face."""
    from edgeface.vision.images import load_image

    cfg = obj.config
    rgb = load_image(image)
    with make_analyzer(cfg) as analyzer, open_gallery(cfg, model=analyzer_model(analyzer), read_only=True) as gallery:
        gallery.person(person)  # unknown name: one-line error before any work
        res, _n = analyzer.analyze_main(rgb)
        if res is None:
            raise NoFaceError(f"no face found in {image}")
        m = gallery.verify(res.embedding, person)
    if as_json:
        click.echo(json.dumps({"image": str(image), "person": person, "same": m.known, "distance": round(m.distance, 4),
                               "threshold": m.threshold}))
    else:
        click.echo(_csv_line(image, m.name if m.known else UNKNOWN, f"{m.distance:.3f}"))
    return int(ExitStatus.OK) if m.known else int(ExitStatus.ERROR)


# ----------------------------------------------------------------------------------------------- people


@click.group("people")
def people_group() -> None:
    """List and manage enrolled people."""


@people_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout.")
@pass_ctx
def people_list(obj: CliContext, as_json: bool) -> None:
    """Every enrolled person: name, enabled/disabled, number of embeddings, external id."""
    with open_gallery(obj.config, read_only=True) as g:
        people = g.people()
    if as_json:
        click.echo(json.dumps([p.as_dict() for p in people], indent=2))
        return
    for p in people:
        click.echo(_csv_line(p.name, "enabled" if p.enabled else "disabled", p.n_embeddings, p.external_id or ""))
        if p.rule_error is not None:
            _warn(f"{p.name!r} is denied by the daemon: {p.rule_error}")


@people_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout.")
@pass_ctx
def people_show(obj: CliContext, name: str, as_json: bool) -> None:
    """Details of one person."""
    with open_gallery(obj.config, read_only=True) as g:
        d = g.person(name).as_dict()
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    for key in ("name", "id", "external_id", "enabled", "embeddings", "schedule", "created", "updated", "rule_error"):
        if key not in d:
            continue
        value = d[key]
        click.echo(f"{key}: {json.dumps(value) if isinstance(value, (dict, bool)) or value is None else value}")


def _simple(action: str, help_text: str):
    @people_group.command(action, help=help_text)
    @click.argument("name")
    @pass_ctx
    def cmd(obj: CliContext, name: str) -> None:
        with open_gallery(obj.config) as g:
            getattr(g, action)(name)
        _warn(f"{action}d {name!r}")

    return cmd


_simple("disable", "Stop NAME from matching (takes effect on the daemon's next frame); keeps the embeddings.")
_simple("enable", "Let a disabled NAME match again.")


@people_group.command("rename")
@click.argument("name")
@click.argument("new_name")
@pass_ctx
def people_rename(obj: CliContext, name: str, new_name: str) -> None:
    """Rename NAME to NEW_NAME."""
    with open_gallery(obj.config) as g:
        g.rename(name, new_name)
    _warn(f"renamed {name!r} to {new_name!r}")


@people_group.command("remove")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
def people_remove(obj: CliContext, name: str, yes: bool) -> None:
    """Remove NAME and erase their embeddings (and kept face chips)."""
    with open_gallery(obj.config) as g:
        g.person(name)
        if not yes:
            click.confirm(f"remove {name!r} and erase their face data?", abort=True, err=True)
        n = g.remove(name)
    _warn(f"removed {name!r} ({n} embeddings erased)")


def schedule_from_options(days: Optional[str], windows: tuple[str, ...], always: bool) -> Optional[dict]:
    """The stored schedule form of --days / --window / --always (None: any time); the gallery validates it."""
    if always and (days or windows):
        raise click.UsageError("--always takes no --days or --window")
    if not always and not (days or windows):
        raise click.UsageError("give --days and/or --window, or --always")
    if always:
        return None
    schedule: dict = {}
    if days:
        schedule["days"] = [d.strip().lower() for d in days.split(",") if d.strip()]
    if windows:
        schedule["windows"] = [w.split("-", 1) if "-" in w else [w, ""] for w in windows]
    return schedule


@people_group.command("schedule")
@click.argument("name")
@click.option("--days", default=None, help="Comma-separated days, e.g. mon,tue,wed,thu,fri (default: every day).")
@click.option("--window", "windows", multiple=True, metavar="HH:MM-HH:MM",
              help="Allowed time window (repeatable), in policy.timezone; default all day.")
@click.option("--always", is_flag=True, help="Remove the schedule: NAME may enter at any time.")
@pass_ctx
def people_schedule(obj: CliContext, name: str, days: Optional[str], windows: tuple[str, ...], always: bool) -> None:
    """Set when NAME may enter (weekdays and time windows)."""
    schedule = schedule_from_options(days, windows, always)
    with open_gallery(obj.config) as g:
        g.set_schedule(name, schedule)
        d = g.person(name).schedule
    _warn(f"schedule of {name!r}: {json.dumps(d) if d else 'any time'}")


# ----------------------------------------------------------------------------------------------- gallery


@click.group("gallery")
def gallery_group() -> None:
    """Export, import and inspect the gallery file."""


@gallery_group.command("export")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
@pass_ctx
def gallery_export(obj: CliContext, file: Path, force: bool) -> None:
    """Write every person and embedding to FILE (portable JSON, mode 0600; it is biometric data)."""
    if file.exists() and not force:  # an older export may be the only backup: never replace it silently
        raise GalleryError(f"export file {file} exists; give --force to replace it")
    with open_gallery(obj.config, read_only=True) as g:
        n = g.export(file)
    _warn(f"exported {n} people to {file}")


@gallery_group.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--merge", is_flag=True, help="Add embeddings to people who already exist instead of failing.")
@pass_ctx
def gallery_import(obj: CliContext, file: Path, merge: bool) -> None:
    """Load an export FILE into the gallery (one transaction: all or nothing)."""
    make_gallery_dirs(obj.config)
    with open_gallery(obj.config, create=True) as g:
        n = g.import_(file, merge=merge)
    _warn(f"imported {n} people from {file}")


@gallery_group.command("stats")
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout.")
@pass_ctx
def gallery_stats(obj: CliContext, as_json: bool) -> None:
    """Counts, model, threshold and file size of the gallery."""
    with open_gallery(obj.config, read_only=True) as g:
        s = g.stats()
    if as_json:
        click.echo(json.dumps(s, indent=2))
    else:
        for k, v in s.items():
            click.echo(f"{k}: {v}")


@gallery_group.command("reembed")
@pass_ctx
def gallery_reembed(obj: CliContext) -> None:
    """After a model change: re-embed the kept face chips with the configured embedder (needs keep_crops)."""
    cfg = obj.config
    with make_analyzer(cfg) as analyzer:
        with open_gallery(cfg, model=analyzer_model(analyzer), allow_model_change=True) as g:
            n = g.reembed(analyzer.embedder)
    _warn(f"re-embedded {n} face chips with {analyzer.embedder.model_id}")


def register(group: click.Group) -> None:
    for cmd in (enroll_cmd, identify_cmd, verify_cmd, people_group, gallery_group):
        group.add_command(cmd)


__all__ = ["register", "UNKNOWN", "NO_FACE"]
