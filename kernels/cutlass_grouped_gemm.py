# mypy: ignore-errors
# (CuTe DSL code is traced, not run: struct fields are annotations evaluated as code and
# operators act on DSL values, which mypy cannot follow.)
"""Hopper (sm_90a) grouped GEMM in the CUTLASS CuTe DSL: TMA loads into a multi-stage shared-memory
pipeline, WGMMA with fp32 accumulation, one expert per 128-row tile.

Layout ("contiguous grouped", as DeepGEMM calls it): the rows of A are sorted by expert and each
expert's segment is padded to a multiple of 128 rows (the `moe_align` layout with block_m=128).
`tile_expert[i]` names the expert of rows 128*i .. 128*i+127, or -1 for a tile past the used
rows; such tiles exit at once and leave C untouched.

    C[M, N] = A[M, K] @ B[tile_expert[m // 128]][N, K].T        A, B: bf16/fp16, C: A's dtype

B is stacked nn.Linear weights [E, N, K] (K contiguous). Constraints: M a multiple of 128, N a
multiple of the N tile (128), K a multiple of 8 (16-byte TMA strides); TMA zero-fills the K tail.

This module imports cutlass at the top: import it only where the CUTLASS path is wanted. Kernels
compile per (dtype, N tile) and are cached; `compile_for_arch` compiles without a GPU (set
CUTE_DSL_ARCH=sm_90a) and is what the CPU test uses to prove the kernel builds to a cubin.
"""

from __future__ import annotations

from typing import Any

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils.hopper_helpers as sm90_utils
import torch
from cutlass.cute.runtime import from_dlpack, make_fake_tensor
from cutlass.tensor_utils import LayoutEnum

TILE_M = 128
_SMEM_BYTES = 232448  # sm_90: 227 KiB of shared memory per CTA
_TORCH_TO_CUTLASS = {torch.bfloat16: cutlass.BFloat16, torch.float16: cutlass.Float16}


class HopperGroupedGemm:
    """One CTA per (128-row tile, N tile); one warpgroup issues WGMMA on a 128 x tile_n tile."""

    def __init__(self, tile_n: int = 128, acc_dtype: type[cutlass.Numeric] = cutlass.Float32) -> None:
        if tile_n not in (64, 128, 256):
            raise ValueError(f"tile_n must be 64, 128 or 256, got {tile_n}")
        self.tile_n = tile_n
        self.acc_dtype = acc_dtype
        self.threads = 128
        self.buffer_align_bytes = 1024

    @cute.jit
    def __call__(
        self,
        a: cute.Tensor,
        b: cute.Tensor,
        c: cute.Tensor,
        tile_expert: cute.Tensor,
        stream: cuda.CUstream,
    ) -> None:
        self.a_dtype = a.element_type
        self.b_dtype = b.element_type
        self.c_dtype = c.element_type
        a_layout = LayoutEnum.from_tensor(a)
        b_layout = LayoutEnum.from_tensor(b)

        tiled_mma = sm90_utils.make_trivial_tiled_mma(
            self.a_dtype,
            self.b_dtype,
            a_layout.sm90_mma_major_mode(),
            b_layout.sm90_mma_major_mode(),
            self.acc_dtype,
            (1, 1, 1),
            tiler_mn=(64, self.tile_n),
        )
        # Four MMA K-steps per pipeline stage: 64 elements of K for 16-bit types.
        tile_k = cute.size(tiled_mma.shape_mnk, mode=[2]) * 4
        self.tile_shape_mnk = (TILE_M, self.tile_n, tile_k)
        stage_bytes = (TILE_M + self.tile_n) * tile_k * self.a_dtype.width // 8
        self.ab_stage = min((_SMEM_BYTES - 1024) // stage_bytes, 8)

        a_smem_staged = sm90_utils.make_smem_layout_a(
            a_layout, self.tile_shape_mnk, self.a_dtype, self.ab_stage
        )
        b_smem_staged = sm90_utils.make_smem_layout_b(
            b_layout, self.tile_shape_mnk, self.b_dtype, self.ab_stage
        )
        tma_atom_a, tma_a = cute.nvgpu.cpasync.make_tiled_tma_atom(
            cute.nvgpu.cpasync.CopyBulkTensorTileG2SOp(),
            a,
            cute.slice_(a_smem_staged, (None, None, 0)),
            (TILE_M, tile_k),
        )
        tma_atom_b, tma_b = cute.nvgpu.cpasync.make_tiled_tma_atom(
            cute.nvgpu.cpasync.CopyBulkTensorTileG2SOp(),
            b,
            cute.slice_(b_smem_staged, (None, None, 0)),
            (self.tile_n, tile_k),
        )

        @cute.struct
        class SharedStorage:
            barriers: cute.struct.MemRange[cutlass.Int64, self.ab_stage * 2]
            smem_a: cute.struct.Align[
                cute.struct.MemRange[self.a_dtype, cute.cosize(a_smem_staged)], self.buffer_align_bytes
            ]
            smem_b: cute.struct.Align[
                cute.struct.MemRange[self.b_dtype, cute.cosize(b_smem_staged)], self.buffer_align_bytes
            ]

        self.shared_storage = SharedStorage
        grid = (
            cute.ceil_div(cute.size(c, mode=[0]), TILE_M),
            cute.ceil_div(cute.size(c, mode=[1]), self.tile_n),
            1,
        )
        self.kernel(
            tma_atom_a, tma_a, tma_atom_b, tma_b, c, tile_expert, tiled_mma, a_smem_staged, b_smem_staged
        ).launch(grid=grid, block=[self.threads, 1, 1], cluster=(1, 1, 1), stream=stream)

    @cute.kernel
    def kernel(
        self,
        tma_atom_a: cute.CopyAtom,
        mA_mkl: cute.Tensor,
        tma_atom_b: cute.CopyAtom,
        mB_nke: cute.Tensor,
        mC_mnl: cute.Tensor,
        tile_expert: cute.Tensor,
        tiled_mma: cute.TiledMma,
        a_smem_staged: cute.ComposedLayout,
        b_smem_staged: cute.ComposedLayout,
    ) -> None:
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        tidx, _, _ = cute.arch.thread_idx()
        bidx, bidy, _ = cute.arch.block_idx()
        expert = tile_expert[bidx]
        # Tiles past the used rows (expert -1) do nothing; the whole CTA takes the same branch.
        if expert >= 0:
            if warp_idx == 0:
                cute.nvgpu.cpasync.prefetch_descriptor(tma_atom_a)
                cute.nvgpu.cpasync.prefetch_descriptor(tma_atom_b)

            smem = cutlass.utils.SmemAllocator()
            storage = smem.allocate(self.shared_storage)
            tx_bytes = cute.size_in_bytes(
                self.a_dtype, cute.slice_(a_smem_staged, (None, None, 0))
            ) + cute.size_in_bytes(self.b_dtype, cute.slice_(b_smem_staged, (None, None, 0)))
            mainloop = pipeline.PipelineTmaAsync.create(
                barrier_storage=storage.barriers.data_ptr(),
                num_stages=self.ab_stage,
                producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
                consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, self.threads // 32),
                tx_count=tx_bytes,
                cta_layout_vmnk=cute.make_layout((1, 1, 1, 1)),
                defer_sync=True,
            )
            pipeline.pipeline_init_arrive()

            sA = storage.smem_a.get_tensor(a_smem_staged.outer, swizzle=a_smem_staged.inner)
            sB = storage.smem_b.get_tensor(b_smem_staged.outer, swizzle=b_smem_staged.inner)

            # A and C use batch 0; B's batch coordinate is this tile's expert.
            gA = cute.local_tile(mA_mkl, self.tile_shape_mnk, (bidx, bidy, None, 0), proj=(1, None, 1))
            gB = cute.local_tile(mB_nke, self.tile_shape_mnk, (bidx, bidy, None, expert), proj=(None, 1, 1))
            gC = cute.local_tile(mC_mnl, self.tile_shape_mnk, (bidx, bidy, None, 0), proj=(1, 1, None))

            tAsA, tAgA = cute.nvgpu.cpasync.tma_partition(
                tma_atom_a, 0, cute.make_layout(1), cute.group_modes(sA, 0, 2), cute.group_modes(gA, 0, 2)
            )
            tBsB, tBgB = cute.nvgpu.cpasync.tma_partition(
                tma_atom_b, 0, cute.make_layout(1), cute.group_modes(sB, 0, 2), cute.group_modes(gB, 0, 2)
            )

            # WGMMA reads A/B descriptors per warpgroup (slice 0); the accumulator is per thread.
            wg_mma = tiled_mma.get_slice(0)
            tCrA = tiled_mma.make_fragment_A(wg_mma.partition_A(sA))
            tCrB = tiled_mma.make_fragment_B(wg_mma.partition_B(sB))
            thr_mma = tiled_mma.get_slice(tidx)
            tCgC = thr_mma.partition_C(gC)
            acc = cute.make_rmem_tensor(tCgC.shape, self.acc_dtype)

            pipeline.pipeline_init_wait()

            k_tiles = cute.size(gA, mode=[2])
            producer = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.ab_stage)
            consumer = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.ab_stage)
            release = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.ab_stage)

            if warp_idx == 0:
                for _ in cutlass.range(cutlass.min(self.ab_stage, k_tiles), unroll=1):
                    mainloop.producer_acquire(producer)
                    bar = mainloop.producer_get_barrier(producer)
                    cute.copy(
                        tma_atom_a,
                        tAgA[(None, producer.count)],
                        tAsA[(None, producer.index)],
                        tma_bar_ptr=bar,
                    )
                    cute.copy(
                        tma_atom_b,
                        tBgB[(None, producer.count)],
                        tBsB[(None, producer.index)],
                        tma_bar_ptr=bar,
                    )
                    mainloop.producer_commit(producer)
                    producer.advance()

            tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, False)
            k_blocks = cute.size(tCrA, mode=[2])
            for k_tile in cutlass.range(k_tiles, unroll=1):
                mainloop.consumer_wait(consumer)
                cute.nvgpu.warpgroup.fence()
                for kb in cutlass.range(k_blocks, unroll_full=True):
                    coord = (None, None, kb, consumer.index)
                    cute.gemm(tiled_mma, acc, tCrA[coord], tCrB[coord], acc)
                    tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, True)
                cute.nvgpu.warpgroup.commit_group()
                # Keep one WGMMA batch in flight; release the stage the previous batch read.
                cute.nvgpu.warpgroup.wait_group(1)
                consumer.advance()
                if k_tile > 0:
                    mainloop.consumer_release(release)
                    release.advance()
                    # Refill the stage just released. Warp 0 is also a consumer: it must release
                    # before it acquires, or it would wait on its own arrive.
                    if warp_idx == 0 and producer.count < k_tiles:
                        mainloop.producer_acquire(producer)
                        bar = mainloop.producer_get_barrier(producer)
                        cute.copy(
                            tma_atom_a,
                            tAgA[(None, producer.count)],
                            tAsA[(None, producer.index)],
                            tma_bar_ptr=bar,
                        )
                        cute.copy(
                            tma_atom_b,
                            tBgB[(None, producer.count)],
                            tBsB[(None, producer.index)],
                            tma_bar_ptr=bar,
                        )
                        mainloop.producer_commit(producer)
                        producer.advance()
            cute.nvgpu.warpgroup.wait_group(0)

            # Epilogue: convert in registers and store straight to global memory.
            out = cute.make_rmem_tensor(tCgC.shape, self.c_dtype)
            out.store(acc.load().to(self.c_dtype))
            cute.autovec_copy(out, tCgC)


def _mnl(t: torch.Tensor) -> torch.Tensor:
    """[R, C] row-major -> (R, C, 1) view with C contiguous, the DSL's (M/N, K, L) convention."""
    return t.unsqueeze(0).permute(1, 2, 0)


def _as_cute(t: torch.Tensor, dtype: type[cutlass.Numeric] | None = None) -> Any:
    ct = from_dlpack(t, assumed_align=16)
    if dtype is not None:
        ct.element_type = dtype
    return ct.mark_layout_dynamic(leading_dim=1) if t.dim() == 3 else ct


_compiled: dict[tuple[torch.dtype, int], Any] = {}


def launch_args(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, tile_expert: torch.Tensor, stream: Any
) -> tuple:
    """DSL arguments with dynamic layouts, so one compiled kernel serves every shape."""
    return (
        _as_cute(_mnl(a)),
        _as_cute(b.permute(1, 2, 0)),
        _as_cute(_mnl(c)),
        from_dlpack(tile_expert, assumed_align=4).mark_layout_dynamic(),
        stream,
    )


def _check(a: torch.Tensor, b: torch.Tensor, tile_expert: torch.Tensor, tile_n: int) -> None:
    m, k = a.shape
    _, n, k2 = b.shape
    if a.dtype not in _TORCH_TO_CUTLASS or b.dtype != a.dtype:
        raise TypeError(
            f"CUTLASS grouped GEMM takes bf16/fp16 A and B of one dtype, got {a.dtype}, {b.dtype}"
        )
    if k != k2 or m % TILE_M or n % tile_n or k % 8:
        raise ValueError(
            f"CUTLASS grouped GEMM needs M % {TILE_M} == 0, N % {tile_n} == 0, K % 8 == 0 and matching K; "
            f"got A {tuple(a.shape)}, B {tuple(b.shape)}"
        )
    if tile_expert.shape != (m // TILE_M,) or tile_expert.dtype != torch.int32:
        raise ValueError(
            f"tile_expert must be int32 [{m // TILE_M}], got {tile_expert.dtype} {tuple(tile_expert.shape)}"
        )


def grouped_gemm(
    a: torch.Tensor, b: torch.Tensor, tile_expert: torch.Tensor, tile_n: int = 128
) -> torch.Tensor:
    """C [M, N] = A [M, K] @ B[tile_expert[m // 128]].T, B [E, N, K]; runs on a Hopper GPU."""
    _check(a, b, tile_expert, tile_n)
    a, b, tile_expert = a.contiguous(), b.contiguous(), tile_expert.contiguous()
    c = torch.zeros(a.shape[0], b.shape[1], device=a.device, dtype=a.dtype)
    if a.shape[0] == 0:
        return c
    stream = cuda.CUstream(torch.cuda.current_stream(a.device).cuda_stream)
    args = launch_args(a, b, c, tile_expert, stream)
    key = (a.dtype, tile_n)
    if key not in _compiled:
        _compiled[key] = cute.compile(HopperGroupedGemm(tile_n), *args)
    _compiled[key](*args)
    return c


def compile_for_arch(dtype: torch.dtype = torch.bfloat16, tile_n: int = 128) -> Any:
    """Compile with symbolic shapes and no GPU (set CUTE_DSL_ARCH=sm_90a first); returns the
    compiled function, whose PTX/cubin the DSL writes when CUTE_DSL_KEEP=ptx,cubin is set."""
    el = _TORCH_TO_CUTLASS[dtype]
    m, n, k, e = (
        cute.sym_int32(divisibility=TILE_M),
        cute.sym_int32(divisibility=tile_n),
        cute.sym_int32(divisibility=8),
        cute.sym_int32(),
    )
    ld = cute.sym_int64(divisibility=8)
    a = make_fake_tensor(el, (m, k, 1), (ld, 1, cute.sym_int64(divisibility=8)), assumed_align=16)
    b = make_fake_tensor(
        el, (n, k, e), (cute.sym_int64(divisibility=8), 1, cute.sym_int64(divisibility=8)), assumed_align=16
    )
    c = make_fake_tensor(
        el, (m, n, 1), (cute.sym_int64(divisibility=8), 1, cute.sym_int64(divisibility=8)), assumed_align=16
    )
    tiles = make_fake_tensor(cutlass.Int32, (cute.sym_int32(),), (1,), assumed_align=4)
    return cute.compile(HopperGroupedGemm(tile_n), a, b, c, tiles, cuda.CUstream(0))


__all__ = ["TILE_M", "HopperGroupedGemm", "compile_for_arch", "grouped_gemm", "launch_args"]
