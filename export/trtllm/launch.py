"""The serving files beside the checkpoint: the options YAML, `launch.sh` (trtllm-serve, the
OpenAI-compatible server) and `llm_api.py` (the same options through the Python `LLM` API)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .schema import floor

OPTIONS_FILE = "extra_llm_api_options.yaml"
LAUNCH_FILE = "launch.sh"
LLM_API_FILE = "llm_api.py"

_LAUNCH = """#!/usr/bin/env bash
# Serve this folder with TensorRT-LLM's PyTorch backend (OpenAI-compatible HTTP server).
# The checkpoint is a Hugging Face layout folder; {options} holds the parallelism, KV-cache
# and MTP speculation settings (it overrides the flags below where both are given).
# Needs: NVIDIA GPU(s), tensorrt_llm >= {floor} (the oldest release with Glm4MoeForCausalLM and every
# field the options file uses; older ones refuse unknown fields).
# Attention: {attention}.
{notes}set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
exec trtllm-serve "$HERE" \\
  --backend pytorch \\
  --tp_size {tp} --pp_size {pp} --ep_size {ep} \\
  --max_batch_size {max_batch_size} --max_num_tokens {max_num_tokens} --max_seq_len {max_seq_len} \\
  --extra_llm_api_options "$HERE/{options}" \\
  "$@"
"""

_LLM_API = '''"""Generate with this folder through TensorRT-LLM's Python LLM API (GPU required,
tensorrt_llm >= {floor}: the oldest release whose LLM arguments take every option written here):
python llm_api.py "prompt text" """

import sys
from pathlib import Path

import yaml

from .schema import floor
from tensorrt_llm import LLM, SamplingParams
from tensorrt_llm.llmapi import MTPDecodingConfig

here = Path(__file__).resolve().parent
opts = yaml.safe_load((here / "{options}").read_text())
spec = opts.pop("speculative_config", None)
if spec is not None:
    spec.pop("decoding_type")
    opts["speculative_config"] = MTPDecodingConfig(**spec)
llm = LLM(model=str(here), **opts)
prompt = sys.argv[1] if len(sys.argv) > 1 else "Hello"
for out in llm.generate([prompt], SamplingParams(max_tokens=32, temperature=0.0)):
    print(out.outputs[0].text)
'''


def write_serving_files(
    out: Path, opts: dict[str, Any], attention: str = "as the options say", notes: tuple[str, ...] = ()
) -> None:
    """`notes`: where the served layout is not the shard plan's (one line each in both headers)."""
    need = floor(opts)
    plan = "".join(f"# Plan: {n}.\n" for n in notes)
    (out / OPTIONS_FILE).write_text(
        "# TensorRT-LLM LLM API options (trtllm-serve --extra_llm_api_options, or LLM(**options)).\n"
        f"# Written by glmc; fields checked against TensorRT-LLM {need}'s llm_args.py: needs tensorrt_llm >= {need}.\n"
        f"# Attention: {attention}.\n" + plan + yaml.safe_dump(opts, sort_keys=False)
    )
    launch = out / LAUNCH_FILE
    launch.write_text(
        _LAUNCH.format(
            options=OPTIONS_FILE,
            floor=need,
            attention=attention,
            notes=plan,
            tp=opts["tensor_parallel_size"],
            pp=opts["pipeline_parallel_size"],
            ep=opts["moe_expert_parallel_size"],
            max_batch_size=opts["max_batch_size"],
            max_num_tokens=opts["max_num_tokens"],
            max_seq_len=opts["max_seq_len"],
        )
    )
    launch.chmod(0o755)
    (out / LLM_API_FILE).write_text(_LLM_API.format(options=OPTIONS_FILE, floor=need))
