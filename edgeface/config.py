"""One validated configuration model (pydantic, unknown keys forbidden), read from YAML.

Each section belongs to one stage. Errors come back as one line per problem naming the file, the key
path, the value and what was expected.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgeface.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/edgeface/config.yaml")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CameraConfig(Section):
    source: str = Field("picamera", description="'picamera', a device index (0), an RTSP/HTTP URL, a video file, "
                                               "or a folder of images ('demo' = the shipped sample faces).")
    width: int = Field(1280, ge=64, le=7680, description="Requested capture width (pixels).")
    height: int = Field(720, ge=64, le=4320, description="Requested capture height (pixels).")
    max_fps: float = Field(10.0, gt=0, le=120, description="Frame-rate cap: frames faster than this are skipped.")
    reconnect_min_s: float = Field(1.0, gt=0, le=60, description="First wait before reopening a failed camera.")
    reconnect_max_s: float = Field(30.0, gt=0, le=3600, description="Longest wait between reopen attempts.")
    loop: bool = Field(False, description="Replay a video file or image folder forever (demo).")
    frozen_after_s: float = Field(10.0, gt=0, le=3600,
                                  description="Report the camera unhealthy when frames stop changing for this long.")
    lores_width: int = Field(640, ge=0, le=1920, description="Pi camera only: width of picamera2's low-resolution "
                                                            "stream (height keeps the main stream's aspect) that the "
                                                            "presence gate and the detector look at; faces are still "
                                                            "cropped from the main stream. 0 = detect on the main "
                                                            "stream.")

    @field_validator("source", mode="before")
    @classmethod
    def _index_as_text(cls, value: Any) -> Any:
        """`source: 0` unquoted (as the README writes it) is YAML's integer 0: read it as the device index '0'."""
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise ValueError(f"a camera device index is 0 or more, got {value}")
            return str(value)
        return value


class DetectorConfig(Section):
    variant: Literal["short", "full"] = Field("short", description="BlazeFace short range (<= ~2 m) or full range (<= ~5 m).")
    model: Optional[str] = Field(None, description="Model name in models/manifest.json or a path; default per variant.")
    score_threshold: float = Field(0.6, gt=0, lt=1, description="Detector confidence needed to keep a face.")
    nms_iou: float = Field(0.3, gt=0, lt=1, description="Boxes overlapping more than this are merged.")
    min_face_size: int = Field(40, ge=0, le=4000, description="Ignore faces smaller than this (pixels, box side).")
    fallback_full_range: bool = Field(True, description="When the short-range model finds no face, also try the "
                                                        "full-range one. In a 1280x720 frame short range alone misses "
                                                        "most faces under ~160 px (the door accepts 80 px); an empty "
                                                        "frame then costs two detector runs (docs/benchmarks.md).")
    refine_landmarks: bool = Field(True, description="Run the 468-point face mesh on each face: five-point alignment "
                                                     "(more accurate) and a face-presence check (fewer false faces).")
    min_presence: float = Field(0.5, ge=0, le=1, description="Face-mesh presence probability needed to keep a face.")
    landmark_passes: Literal[1, 2] = Field(1, description="Face-mesh runs per face: 2 crops the mesh again around "
                                                          "its own first points (better alignment: +0.17 to +0.31 points "
                                                          "correct accept at 1% stranger false-accept on the open-set "
                                                          "tuning half, mixed at 0.1%) for one more mesh run per face "
                                                          "(a decision projects to 246-304 ms on a Pi 4 instead of "
                                                          "221-273; worth it on a Pi 5). docs/daemon.md.")
    num_threads: Optional[int] = Field(None, ge=1, le=16, description="Interpreter threads; default min(4, cores).")


class PresenceConfig(Section):
    """The cheap gate before detection: an empty, unchanging doorway runs the detector only now and then."""

    enabled: bool = Field(True, description="Skip the detector on frames where nothing moved (frame differencing on a "
                                            "small grayscale copy); it still runs every detect_every_s, and on every "
                                            "frame while motion or a face was seen within hold_s. Measured on the "
                                            "replayed doorway sequences: no missed entrance, no added latency "
                                            "(docs/benchmarks.md).")
    width: int = Field(64, ge=16, le=640, description="Width of the grayscale copy compared (pixels).")
    pixel_threshold: int = Field(20, ge=1, le=255, description="Grey-level change of one pixel of the copy that counts "
                                                               "as changed (after removing the frame's overall "
                                                               "brightness change, so lighting flicker is not motion).")
    min_changed: float = Field(0.01, gt=0, le=1, description="Fraction of the copy's pixels that must change to count "
                                                             "as motion.")
    background_rate: float = Field(0.05, gt=0, le=1, description="How fast the background follows the image (per "
                                                                 "frame; slow light changes are absorbed).")
    detect_every_s: float = Field(3.0, gt=0, le=60, description="Run the detector at least this often even when nothing "
                                                               "moves (a person standing still is not missed). Each "
                                                               "run on an empty frame is both BlazeFace models; with "
                                                               "3 s an empty doorway was estimated at 4-16% of one Pi 4 "
                                                               "core, 73-290% without the gate (docs/benchmarks.md).")
    hold_s: float = Field(2.0, ge=0, le=60, description="Keep detecting on every frame this long after the last motion "
                                                        "or face.")


class EmbedderConfig(Section):
    model: str = Field("sface_int8", description="Embedder name in models/manifest.json or a .tflite path (default "
                                               "SFace, chosen on the open-set tuning half; facenet_int8 is also "
                                               "shipped: docs/accuracy.md, models/MODELS.md).")
    preprocessing: Optional[Literal["prewhiten", "arcface"]] = Field(
        None, description="Only for a model not in the manifest: its pixel normalisation.")
    template: Optional[Literal["facenet160", "arcface112"]] = Field(
        None, description="Only for a model not in the manifest: its alignment template.")
    flip_augment: bool = Field(False, description="Also embed the mirrored crop and average: +0.5 points correct accept "
                                                  "at 0.1% stranger false-accept on the open-set tuning half (sface_int8, "
                                                  "K=100, E=3), twice the embedding time; off by default for latency on "
                                                  "a Pi (docs/accuracy.md, models/MODELS.md).")
    num_threads: Optional[int] = Field(None, ge=1, le=16, description="Interpreter threads; default min(4, cores).")
    head: Optional[str] = Field(
        None, description="An embedding head trained with `edgeface train-head` (manifest name, or a .tflite path with "
                          "its .json beside it), applied after the embedder. Off by default: the heads measured so far "
                          "did not beat the plain embedder (docs/training.md). A gallery enrolled without it (or with "
                          "another head) is refused until `edgeface gallery reembed`.")
    source_weights: Optional[str] = Field(
        None, description="Source weights to convert from when the model file is missing (needs edgeface[convert]): the "
                          "Keras FaceNet .h5, or the SFace .onnx (face_recognition_sface_2021dec_int8bq.onnx).")
    representative_dir: Optional[str] = Field(
        None, description="Face photos (<person>/*.jpg) to calibrate that conversion to int8; without them a missing "
                          "FaceNet model is converted with int8 weights only (dynamic range), a missing SFace model to "
                          "float16 (as accurate, about twice the embedding time).")


class GalleryConfig(Section):
    path: str = Field("gallery.db", description="SQLite gallery file (a relative path is under state_dir).")
    keep_crops: bool = Field(False, description="Keep aligned enrollment crops (to re-embed after a model change). "
                                                "Off by default: no face images are stored.")
    max_distance: Optional[float] = Field(
        None, gt=0, le=2, description="Cosine distance at or below which a face matches (0 = identical, lower is "
                                      "stricter). Default: the model's calibrated threshold from the manifest.")
    match_mode: Literal["best", "topk_mean", "centroid", "blend"] = Field(
        "blend", description="Per-person score: distance to the nearest enrolled embedding (best), the mean of the "
                             "top_k nearest (topk_mean), to the person's mean template (centroid), or 0.75 x centroid + "
                             "0.25 x best (blend, the default: chosen on the open-set tuning half, docs/accuracy.md). "
                             "Each has its own calibrated threshold (models/manifest.json).")
    top_k: int = Field(3, ge=1, le=50, description="k for topk_mean.")


class PolicyConfig(Section):
    min_frames: int = Field(3, ge=1, le=100, description="Matching frames (K) needed to grant...")
    window_frames: int = Field(5, ge=1, le=100, description="...out of the last N frames with a face.")
    window_s: float = Field(3.0, gt=0, le=60, description="Frames older than this do not count towards K.")
    cooldown_s: float = Field(10.0, ge=0, le=3600, description="After a grant, the same person is not granted again for this long.")
    unknown_interval_s: float = Field(10.0, ge=0, le=3600, description="At most one 'unknown' event per this many seconds.")
    min_face_size: int = Field(80, ge=0, le=4000, description="Faces smaller than this (pixels) never open the door.")
    enabled: bool = Field(True, description="Global switch: when false nobody is granted (events still report).")
    timezone: str = Field("UTC", description="Time zone of access schedules (IANA name, e.g. Europe/Berlin).")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("unknown IANA time zone (e.g. UTC, Europe/Berlin)") from None
        return value

    @model_validator(mode="after")
    def _k_within_n(self) -> "PolicyConfig":
        if self.min_frames > self.window_frames:
            raise ValueError(f"min_frames ({self.min_frames}) must be <= window_frames ({self.window_frames})")
        return self


class DoorConfig(Section):
    door_id: str = Field("front", pattern=r"^[A-Za-z0-9_-]{1,32}$", description="Name of this door in events and topics.")
    # Strict types for the relay line (a YAML integer, a YAML boolean): `edgeface door release` must read the
    # same line from the file without pydantic, and lax parsing would take '27', 'false', 0, even `true` (pin 1).
    relay_pin: int = Field(17, ge=0, le=53, strict=True, description="BCM pin driving the door relay (a number).")
    active_high: bool = Field(True, strict=True, description="true if the relay closes when the pin is high "
                                                             "(true or false).")
    pulse_s: float = Field(3.0, gt=0, le=60, description="How long the relay is held for one grant.")
    contact_pin: Optional[int] = Field(None, ge=0, le=53, strict=True, description="BCM pin of the door contact (optional).")
    contact_closed_is_low: bool = Field(True, strict=True, description="Door contact wiring: closed door pulls the pin low.")
    held_open_s: float = Field(30.0, gt=0, le=3600, description="Alarm when the door stays open longer than this.")
    pin_factory: Optional[Literal["mock", "lgpio", "rpigpio", "pigpio", "native"]] = Field(
        None, description="gpiozero pin factory; default: gpiozero's choice (lgpio on a Pi), 'mock' for demos/tests.")


class MqttConfig(Section):
    enabled: bool = Field(True, description="Publish events over MQTT.")
    host: str = Field("127.0.0.1", min_length=1, description="Broker host.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port.")
    client_id: Optional[str] = Field(None, description="MQTT client id; default edgeface-<door_id>.")
    username: Optional[str] = Field(None, description="Broker user name.")
    password_env: str = Field("EDGEFACE_MQTT_PASSWORD",
                              description="Environment variable (or systemd credential file name) holding the password.")
    tls: bool = Field(False, description="Use TLS.")
    ca_cert: Optional[str] = Field(None, description="CA certificate file for TLS.")
    client_cert: Optional[str] = Field(None, description="Client certificate file for TLS.")
    client_key: Optional[str] = Field(None, description="Client private key file for TLS.")
    topic_prefix: str = Field("edgeface", pattern=r"^[^#+\s]+$", description="Prefix of every topic.")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive.")
    outbox_path: str = Field("outbox.db", description="SQLite outbox: events wait here while the broker is down (relative: under state_dir).")
    outbox_max_events: int = Field(100_000, ge=100, le=10_000_000, description="Outbox bound (see docs/mqtt.md for the policy).")
    ha_discovery: bool = Field(True, description="Publish Home Assistant MQTT discovery.")
    ha_prefix: str = Field("homeassistant", description="Home Assistant discovery prefix.")
    remote_unlock: bool = Field(False, description="Allow an authenticated remote unlock command (off by default).")
    remote_unlock_secret_env: str = Field("EDGEFACE_UNLOCK_SECRET",
                                          description="Environment variable (or credential) with the HMAC secret.")
    command_max_age_s: float = Field(30.0, gt=0, le=600, description="Remote commands older than this are refused.")
    remote_unlock_totp: bool = Field(False, description="Also accept a one-time code (RFC 6238 TOTP from the owner's "
                                                        "authenticator app): what Home Assistant's lock entity sends "
                                                        "(needs remote_unlock; `edgeface door totp-init` makes the secret).")
    totp_secret_env: str = Field("EDGEFACE_UNLOCK_TOTP",
                                 description="Environment variable (or credential) with the base32 TOTP secret.")
    access_switch: bool = Field(True, description="Let MQTT (Home Assistant's Access switch) turn access off and on "
                                                  "again; the state is kept in state_dir (unreadable = off).")
    ha_doorbell: bool = Field(True, description="A Home Assistant Doorbell event (device class doorbell) that rings "
                                                "for every unknown face, so HA and HomeKit treat strangers as a ring.")
    ha_presence: bool = Field(False, description="One Home Assistant sensor per enrolled person: when they were last "
                                                 "let in (off by default: it is a record of who comes and goes).")
    ha_face_image: bool = Field(False, description="A Home Assistant image entity with the face crop of the last "
                                                   "decision (off by default: it sends a face photo to the broker; "
                                                   "kept in memory only, never on disk, not retained on the broker).")
    ha_face_image_px: int = Field(160, ge=32, le=1024, description="Longest side of the face crop image (pixels).")
    configuration_url: Optional[str] = Field(
        None, pattern=r"^https?://\S+$",
        description="Link shown on the Home Assistant device page (e.g. the web app, http://door.local:8080).")

    @model_validator(mode="after")
    def _tls_files(self) -> "MqttConfig":
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key must be given together")
        if (self.ca_cert or self.client_cert) and not self.tls:
            raise ValueError("ca_cert/client_cert are set but tls is false")
        if self.remote_unlock_totp and not self.remote_unlock:
            raise ValueError("remote_unlock_totp is true but remote_unlock is false (turn both on)")
        return self


class AuditConfig(Section):
    path: str = Field("audit.db", description="SQLite audit log of decisions and door events (relative: under state_dir).")
    retention_days: int = Field(90, ge=1, le=3650, description="Audit rows older than this are deleted.")
    max_rows: int = Field(1_000_000, ge=1000, le=100_000_000, description="Audit log bound: oldest rows go first.")


class LivenessConfig(Section):
    enabled: bool = Field(False, description="Require a liveness cue (blink or head motion) before a grant "
                                             "(stops held still photos, not screen videos: docs/security.md).")
    method: Literal["any", "parallax", "blink"] = Field(
        "any", description="Cue that proves liveness: 3-D head motion (parallax), a blink, or either (any).")
    min_motion: float = Field(0.02, ge=0, le=1, description="Minimum landmark motion across the decision window "
                                                          "(inter-ocular distances) before parallax is judged.")
    min_parallax: float = Field(0.04, gt=0, le=1, description="Non-planar residual (inter-ocular distances) that counts "
                                                            "as a real head turning; a flat photo stays below it.")
    min_blink: float = Field(0.45, gt=0, le=1, description="Relative drop of eye openness that counts as a blink.")
    window_s: float = Field(4.0, gt=0, le=60, description="Frames of the last this many seconds are judged.")
    min_frames: int = Field(3, ge=2, le=100, description="Frames with a face mesh needed before judging.")
    max_frames: int = Field(40, ge=2, le=500, description="At most this many recent frames are kept.")


class FleetConfig(Section):
    enabled: bool = Field(False, description="Share one access list between doors through the MQTT broker "
                                             "(docs/fleet.md): signed person changes are applied to this door's gallery.")
    public_key: str = Field("fleet_admin.pub", description="The fleet admin's Ed25519 public key (PEM; relative: under "
                                                           "state_dir). Only the public key: the admin key never lives on a door.")
    state_path: str = Field("fleet.db", description="SQLite file of applied versions and signed changes (relative: "
                                                    "under state_dir).")
    stale_after_s: float = Field(900.0, gt=0, le=30 * 86400,
                                 description="Alarm when no signed admin heartbeat arrived for this long.")
    deny_when_stale: bool = Field(False, description="While stale, deny everyone except allow_when_stale "
                                                     "(a door cut off from revocations fails secure).")
    allow_when_stale: list[str] = Field(default_factory=list, description="Names still let in while the fleet is "
                                                                          "stale and deny_when_stale is true.")
    applied_interval_s: float = Field(1.0, gt=0, le=3600, description="At most one applied-version report per this "
                                                                      "many seconds.")


class EdgefaceConfig(Section):
    state_dir: str = Field("/var/lib/edgeface", description="Directory for the gallery, outbox and audit files (0700).")
    models_dir: Optional[str] = Field(None, description="Directory with models and manifest.json; default: shipped models/.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    camera: CameraConfig = Field(default_factory=CameraConfig)
    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    presence: PresenceConfig = Field(default_factory=PresenceConfig)
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    gallery: GalleryConfig = Field(default_factory=GalleryConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    door: DoorConfig = Field(default_factory=DoorConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    liveness: LivenessConfig = Field(default_factory=LivenessConfig)
    fleet: FleetConfig = Field(default_factory=FleetConfig)


def _line_of(text: str, loc: tuple[Any, ...]) -> Optional[int]:
    """Best-effort line number of a key path in the YAML text (for error messages)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(key):
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def format_validation_error(exc: ValidationError, source: str, text: str = "") -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        where = source
        line = _line_of(text, loc) if text else None
        if line:
            where = f"{source}:{line}"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see config.yaml for every key)"
        value = err.get("input")
        if err["type"] in ("int_type", "bool_type"):  # the strict door fields: say which spellings work
            msg += " (a number, unquoted: 27)" if err["type"] == "int_type" else " (true or false, unquoted)"
        shown = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(value, dict) else f" = {value!r}"
        lines.append(f"{where}: {key}{shown}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, *, source: str = "<config>", text: str = "") -> EdgefaceConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(data).__name__}")
    try:
        return EdgefaceConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source, text)) from None


def load_config(path: str | os.PathLike[str] | None = None) -> EdgefaceConfig:
    """Read and validate a YAML config; `None` gives the built-in defaults."""
    if path is None:
        return EdgefaceConfig()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    return parse_config(data, source=str(path), text=text)


def read_secret(name: str) -> Optional[str]:
    """A secret from systemd's $CREDENTIALS_DIRECTORY/<name> (LoadCredential=) or else the environment."""
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        cred = Path(cred_dir) / name
        if cred.is_file():
            return cred.read_text(encoding="utf-8").strip()
    value = os.environ.get(name)
    return value if value else None


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def render_default_yaml() -> str:
    """The default configuration as commented YAML: every key, its default and its description."""
    lines = ["# edgeface configuration. Every key is shown with its default; delete what you do not change.",
             "# Validate with: edgeface --config /etc/edgeface/config.yaml check-config", ""]

    def emit(model: type[BaseModel], indent: str) -> None:
        for name, field in model.model_fields.items():
            default = field.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                lines.append(f"{indent}{name}:")
                emit(type(default), indent + "  ")
                continue
            desc = (field.description or "").strip()
            if desc:
                lines.append(f"{indent}# {desc}")
            lines.append(f"{indent}{name}: {_yaml_scalar(default)}")
        lines.append("")

    emit(EdgefaceConfig, "")
    return "\n".join(lines).rstrip() + "\n"
