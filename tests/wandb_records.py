"""Read an offline W&B run file (run-<id>.wandb) into protobuf Records.

W&B 0.31 writes a LevelDB-style log: a 7-byte file header (":W&B", magic, version),
then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type:
1 full, 2 first, 3 middle, 4 last); a block tail shorter than a header is padding.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768


def records(path: Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"{path} is not a W&B run file"
    out, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):
            buf = chunk
        else:
            buf += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def history(recs) -> list[dict]:
    rows = []
    for r in recs:
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


def config(recs) -> dict:
    cfg = {}
    for r in recs:
        kind = r.WhichOneof("record_type")
        items = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        for i in items:
            cfg[i.key or ".".join(i.nested_key)] = json.loads(i.value_json)
    return cfg


def summary(recs) -> dict:
    out = {}
    for r in recs:
        if r.WhichOneof("record_type") == "summary":
            for i in r.summary.update:
                out[i.key or ".".join(i.nested_key)] = json.loads(i.value_json)
    return out


def run_info(recs) -> dict:
    """The run record's name, group and job type ('' where unset)."""
    run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
    return {"name": run.display_name, "group": run.run_group, "job_type": run.job_type}


def metric_definitions(recs) -> dict:
    """define_metric calls: name (or glob) -> (step metric, summary ops)."""
    out = {}
    for r in recs:
        if r.WhichOneof("record_type") == "metric":
            m = r.metric
            ops = {op for op in ("min", "max", "mean", "last", "first") if getattr(m.summary, op)}
            out[m.name or m.glob_name] = (m.step_metric, ops)
    return out


def stats(recs) -> list[dict]:
    """W&B's system-metrics samples (proc.memory.rssMB, cpu, ...), one dict per sample."""
    return [{i.key: json.loads(i.value_json) for i in r.stats.item}
            for r in recs if r.WhichOneof("record_type") == "stats"]


def artifacts(recs) -> list[dict]:
    return [{"name": r.artifact.name, "type": r.artifact.type, "files": [c.path for c in r.artifact.manifest.contents]}
            for r in recs if r.WhichOneof("record_type") == "artifact"]
