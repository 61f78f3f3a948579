"""Delta bundles on the fleet: build them from the versions devices run, publish them as TUF targets.

Why here: a delta is a derived artefact of a registered version, like its bundle. For a rollout
the controller asks for deltas from the N most common active bundles of its devices
(`DeltaPolicy.bases`); each is built in both formats of `agent.contract.delta`, checked by
applying it (the result must be byte-identical to the full bundle), and the smaller one is
published as its own TUF target, unless even that is over `max_ratio` of the full bundle (then
devices fetch the full bundle, as they always may).

Delta targets live at `deltas/<name>/<name>-<version>.from-<base version>.efd`; their TUF custom
field is `{delta_of, base_bundle, base_sha256, format}` and carries no `name`/`version`, so
nothing that lists bundles by those labels mistakes a delta for a bundle.

Errors: `build_delta` raises `FleetInputError` for an unreadable bundle; `DeltaCatalog.ensure`
logs and skips a base it cannot build from (a delta is an optimisation, never a requirement).
"""

from __future__ import annotations

import logging
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.contract.delta import DeltaFormat, DeltaHeader, apply_delta, encode_delta, file_sha256
from agent.contract.director import DeltaRef, TargetRef
from agent.errors import EdgefleetError
from agent.logs import log_event
from fleet.errors import FleetError, FleetInputError
from fleet.registry.publish import REPO_LOCK
from fleet.trust.repository import Repository

logger = logging.getLogger("edgefleet.fleet.deltas")


@dataclass(frozen=True)
class DeltaPolicy:
    """How many bases to build deltas from, the largest worthwhile ratio, the zstd level."""

    bases: int = 3  # 0 disables deltas
    max_ratio: float = 0.60
    level: int = 19

    def __post_init__(self) -> None:
        if not 0 <= self.bases <= 16 or not 0 < self.max_ratio <= 1 or not 1 <= self.level <= 22:
            raise FleetInputError("delta policy: bases 0..16, max_ratio in (0, 1], level 1..22")


@dataclass(frozen=True)
class BuiltDelta:
    """One delta file's bytes and the format that produced them."""

    format: str
    data: bytes


def _model_region(bundle: bytes) -> tuple[int, int]:
    """Offset and size of the model member (the second) inside a bundle archive."""
    import io

    with tarfile.open(fileobj=io.BytesIO(bundle), mode="r:") as tar:
        members = tar.getmembers()
    if len(members) != 2:
        raise FleetInputError("a bundle holds exactly a manifest and a model")
    return members[1].offset_data, members[1].size


def _tensor_regions(model: bytes) -> dict[str, tuple[int, int]]:
    """Initializer name -> (offset, length) of its raw bytes inside a serialised ONNX model."""
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx is a fleet dependency
        return {}
    try:
        proto = onnx.load_model_from_string(model)
    except Exception:  # not ONNX (e.g. a LiteRT model): the whole model is one region
        return {}
    out: dict[str, tuple[int, int]] = {}
    cursor = 0
    for init in proto.graph.initializer:
        raw = init.raw_data
        if len(raw) < 64:
            continue
        at = model.find(raw, cursor)
        if at < 0:
            continue
        out[init.name] = (at, len(raw))
        cursor = at + len(raw)
    return out


def _diff_ops(old: bytes, new: bytes) -> tuple[list[list[int | str]], bytes]:
    """Ops and uncompressed body of a `tensor-diff` delta (see `agent.contract.delta`)."""
    import numpy as np

    o_off, o_size = _model_region(old)
    n_off, n_size = _model_region(new)
    o_model, n_model = old[o_off:o_off + o_size], new[n_off:n_off + n_size]
    o_regions = _tensor_regions(o_model)
    pairs: list[tuple[int, int, int]] = []  # (new offset, old offset, length) in bundle coordinates
    for name, (at, length) in _tensor_regions(n_model).items():
        prev = o_regions.get(name)
        if prev is not None and prev[1] == length:
            pairs.append((n_off + at, o_off + prev[0], length))
    if not pairs and o_size == n_size:  # not ONNX: diff the model as one region
        pairs.append((n_off, o_off, n_size))
    ops: list[list[int | str]] = []
    body: list[bytes] = []
    pos = 0
    for n_at, o_at, length in sorted(pairs):
        if n_at < pos:
            continue
        if n_at > pos:
            ops.append(["L", n_at - pos])
            body.append(new[pos:n_at])
        ops.append(["D", length, o_at])
        diff = np.frombuffer(new, np.uint8, length, n_at) - np.frombuffer(old, np.uint8, length, o_at)
        body.append(diff.tobytes())
        pos = n_at + length
    if pos < len(new):
        ops.append(["L", len(new) - pos])
        body.append(new[pos:])
    return ops, b"".join(body)


def build_delta(old_bundle: Path, new_bundle: Path, level: int = 19) -> BuiltDelta:
    """Both delta formats from `old_bundle` to `new_bundle`; the smaller one that rebuilds exactly.

    Raises `FleetInputError` when a bundle cannot be read or no format rebuilds the new bundle.
    """
    import zstandard

    try:
        old, new = Path(old_bundle).read_bytes(), Path(new_bundle).read_bytes()
    except OSError as exc:
        raise FleetInputError(f"cannot read a bundle to build a delta: {exc}") from exc
    target_sha256 = file_sha256(new_bundle)

    def header(fmt: DeltaFormat, ops: list[list[int | str]]) -> DeltaHeader:
        return DeltaHeader(format=fmt, ops=ops, base_sha256=file_sha256(old_bundle), base_length=len(old),
                           target_sha256=target_sha256, target_length=len(new))

    window = max(10, min(30, (max(len(old), len(new)) * 2 - 1).bit_length()))
    candidates: list[BuiltDelta] = []
    ops, body = _diff_ops(old, new)
    cctx = zstandard.ZstdCompressor(level=level)
    candidates.append(BuiltDelta("tensor-diff", encode_delta(
        header("tensor-diff", ops), cctx.compress(body))))
    params = zstandard.ZstdCompressionParameters.from_level(level, window_log=window, enable_ldm=True)
    dictionary = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    patch = zstandard.ZstdCompressor(dict_data=dictionary, compression_params=params).compress(new)
    candidates.append(BuiltDelta("zstd-patch", encode_delta(header("zstd-patch", []), patch)))
    with tempfile.TemporaryDirectory(prefix="efd-check-") as scratch:
        for cand in sorted(candidates, key=lambda c: len(c.data)):
            delta = Path(scratch) / f"{cand.format}.efd"
            delta.write_bytes(cand.data)
            try:
                apply_delta(Path(old_bundle), delta, Path(scratch) / f"{cand.format}.efb",
                            expected_sha256=target_sha256, expected_length=len(new))
            except EdgefleetError as exc:
                log_event(logger, "delta.format_failed", logging.WARNING, format=cand.format, error=str(exc))
                continue
            return cand
    raise FleetInputError("no delta format rebuilds the new bundle exactly")


def delta_path_for(full: TargetRef, base: TargetRef) -> str:
    return f"deltas/{full.name}/{full.name}-{full.version}.from-{base.version}.efd"


def _local_file(repo: Repository, ref: TargetRef) -> Path:
    """The content-addressed file of a published target (consistent snapshots)."""
    dirname, _, basename = ref.path.rpartition("/")
    return repo.targets_dir / dirname / f"{ref.sha256}.{basename}"


def most_common_bases(active_bundles: Iterable[str | None], target_bundle: str, n: int) -> list[str]:
    """The `n` bundle ids most devices run, the target itself and devices with none left out."""
    counts = Counter(b for b in active_bundles if b and b != target_bundle)
    return [b for b, _ in counts.most_common(n)]


class DeltaCatalog:
    """Finds or builds the deltas of one full target; what the rollout controller calls."""

    def __init__(self, repo: Repository, policy: DeltaPolicy | None = None) -> None:
        self.repo = repo
        self.policy = policy or DeltaPolicy()
        self._tried: set[tuple[str, str]] = set()  # (full sha256, base id): built or not worth it

    def for_devices(self, full: TargetRef, index: dict[str, TargetRef],
                    active_bundles: list[str | None]) -> dict[str, DeltaRef]:
        """Deltas to `full` from the `policy.bases` most common of `active_bundles` (ids in `index`)."""
        if self.policy.bases == 0:
            return {}
        return self.ensure(full, self.wanted(full, index, active_bundles))

    def wanted(self, full: TargetRef, index: dict[str, TargetRef],
               active_bundles: list[str | None]) -> list[TargetRef]:
        """The `policy.bases` most common of `active_bundles` that `index` knows."""
        chosen = most_common_bases(active_bundles, f"{full.name}-{full.version}", self.policy.bases)
        return [index[b] for b in chosen if b in index]

    def missing(self, full: TargetRef, index: dict[str, TargetRef],
                active_bundles: list[str | None]) -> list[TargetRef]:
        """The wanted bases with no published delta that were not tried yet (cheap: no build)."""
        have = self.published(full.path)
        return [b for b in self.wanted(full, index, active_bundles)
                if f"{b.name}-{b.version}" not in have and b.path != full.path
                and (full.sha256, f"{b.name}-{b.version}") not in self._tried]

    def published(self, full_path: str) -> dict[str, DeltaRef]:
        """Base bundle id -> delta, for every delta target of `full_path` in the signed targets."""
        out: dict[str, DeltaRef] = {}
        for path, info in self.repo.load("targets").signed.targets.items():
            custom: dict[str, Any] = info.unrecognized_fields.get("custom") or {}
            if custom.get("delta_of") != full_path:
                continue
            try:
                out[str(custom["base_bundle"])] = DeltaRef(
                    path=path, length=info.length, sha256=info.hashes["sha256"],
                    base_bundle=str(custom["base_bundle"]), base_sha256=str(custom["base_sha256"]),
                    format=custom["format"])
            except (KeyError, ValueError):
                continue
        return out

    def ensure(self, full: TargetRef, bases: list[TargetRef]) -> dict[str, DeltaRef]:
        """Publish the deltas from `bases` to `full` that are worth it; return all of `full`'s deltas."""
        have = self.published(full.path)
        for base in bases:
            base_id = f"{base.name}-{base.version}"
            if base_id in have or base.path == full.path or (full.sha256, base_id) in self._tried:
                continue
            self._tried.add((full.sha256, base_id))
            try:
                old, new = _local_file(self.repo, base), _local_file(self.repo, full)
                built = build_delta(old, new, self.policy.level)
            except FleetError as exc:
                log_event(logger, "delta.skipped", logging.WARNING, base=base_id, target=full.path,
                          error=str(exc))
                continue
            ratio = len(built.data) / full.length
            if ratio > self.policy.max_ratio:
                log_event(logger, "delta.not_worth_it", base=base_id, target=full.path, ratio=round(ratio, 3))
                continue
            custom = {"delta_of": full.path, "base_bundle": base_id, "base_sha256": base.sha256,
                      "format": built.format}
            with tempfile.TemporaryDirectory(prefix="efd-") as scratch:
                tmp = Path(scratch) / "delta.efd"
                tmp.write_bytes(built.data)
                with REPO_LOCK:
                    self.repo.add_target(tmp, delta_path_for(full, base), custom)
            log_event(logger, "delta.published", base=base_id, target=full.path, format=built.format,
                      ratio=round(ratio, 4))
        return self.published(full.path)
