"""Per-step metrics: a rich progress bar and log lines on the console, one JSON object per step
in `out/metrics.jsonl` (rank 0 only). MFU = tokens/s x training FLOPs per token
(glmc.ir.flops_per_token: 3x forward, MTP included) / (peak FLOP/s x ranks)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from glmc.errors import GlmcError

METRICS_FILE = "metrics.jsonl"

# Stated peaks for MFU when --peak-tflops is not given (dense, per device).
GPU_PEAK_TFLOPS = 989.0  # H100 SXM BF16 dense
CPU_PEAK_GFLOPS_PER_CORE = 80.0  # ~2.5 GHz x 32 fp32 FLOP/cycle (AVX-512, 2 FMA); a rough figure


def default_peak_tflops(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return GPU_PEAK_TFLOPS, "H100 BF16 dense (989 TFLOP/s)"
    cores = torch.get_num_threads() or os.cpu_count() or 1
    tf = cores * CPU_PEAK_GFLOPS_PER_CORE / 1000
    return tf, f"{cores} CPU cores x {CPU_PEAK_GFLOPS_PER_CORE:.0f} GFLOP/s fp32 ({tf:.2f} TFLOP/s)"


class Telemetry:
    def __init__(
        self, run_dir: Path, enabled: bool, progress: bool, total: int, start: int, log_every: int
    ) -> None:
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self.path = run_dir / METRICS_FILE
        self._progress: Any = None
        self._task: Any = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start)
        from rich.console import Console

        self.console = Console(stderr=True)
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._progress.add_task("train", total=total, completed=start, info="")
            self._progress.start()

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps the resumed run will redo, so the curve stays one curve.
        Written to a temporary file and renamed, so a failure leaves the old file whole."""
        if not self.path.is_file():
            return
        keep = []
        lines = self.path.read_text(errors="replace").splitlines()
        for i, ln in enumerate(lines, 1):
            if not ln.strip():
                continue
            try:
                n = json.loads(ln)["step"]
            except (ValueError, KeyError, TypeError):
                if i == len(lines):
                    continue  # a last line cut short by a crash mid-write
                raise GlmcError(
                    f"{self.path}: line {i} is not a metrics record; fix or remove the file"
                ) from None
            if isinstance(n, int) and n <= step:
                keep.append(ln)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_text("".join(ln + "\n" for ln in keep))
            tmp.replace(self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise GlmcError(f"cannot rewrite {self.path}: {e.strerror or e}") from None

    def say(self, msg: str) -> None:
        if self.enabled:
            self.console.print(msg)

    def log(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError as e:
            raise GlmcError(f"cannot append to {self.path}: {e.strerror or e}") from None
        info = f"loss {rec['loss']:.4f}"
        if self._progress is not None:
            self._progress.update(self._task, completed=rec["step"], info=info)
        if rec["step"] % self.log_every == 0:
            parts = [
                f"step {rec['step']:>6}",
                f"loss {rec['loss']:.4f}",
                f"lm {rec['lm_loss']:.4f}",
            ]
            if rec.get("mtp_loss") is not None:
                parts.append(f"mtp {rec['mtp_loss']:.4f}")
            parts += [
                f"lr {rec['lr']:.2e}",
                f"gnorm {rec['grad_norm']:.3f}",
                f"{rec['tokens_per_s']:,.0f} tok/s",
                f"MFU {100 * rec['mfu']:.2f}%",
            ]
            if rec.get("load_imbalance"):
                parts.append(f"load max/mean {rec['load_imbalance_mean']:.2f}")
            line = "  ".join(parts)
            if self._progress is not None:
                self._progress.console.print(line)
            else:
                self.console.print(line)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
