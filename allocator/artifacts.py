"""What a finished job leaves in its folder: the packed model, the bit plan, the cost table
(profile) and, when the spec asks, the report.

Storing them (artifact store, result rows) is the caller's business; this module only writes
files into the folder it is given and returns {artifact name: path}.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from allocator.apply import pack
from allocator.job import Result
from allocator.plan import BitPlan
from allocator.report import write_report


def write_artifacts(workdir: Path, mixed: torch.nn.Module, plan: BitPlan, result: Result) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    packed = workdir / "model.safetensors"
    pack(mixed, plan, packed)
    plan_path = workdir / "bitplan.json"
    plan_path.write_text(json.dumps(plan.to_dict(), indent=1))
    profile_path = workdir / "profile.json"
    profile_path.write_text(json.dumps(result.profile))
    return {
        "model": str(packed),
        "bitplan": str(plan_path),
        "profile": str(profile_path),
        **(write_report(workdir, result) if result.spec.report else {}),
    }
