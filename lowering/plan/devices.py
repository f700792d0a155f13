"""Device profiles: data, one entry per device, each figure with its source.

Figures are per GPU (per process for ``cpu``), in SI units: FLOP/s, bytes, bytes/s
(one direction). ``peak_flops`` is the dense tensor-core peak per dtype (no sparsity).
``intra_node_bw`` is NVLink's per-GPU bandwidth in one direction (half the
bidirectional figure datasheets quote); ``inter_node_bw`` the network bandwidth per GPU
(one NIC per GPU in the reference systems). Mesh axes map onto links in the canonical
order (tp innermost, then sp, ep, dp, pp): a group whose ranks span at most
``gpus_per_node`` consecutive ranks talks over NVLink, else over the network.

The time model's factors, the same for every GPU and not fitted to any training run:

* ``matmul_efficiency`` 0.7: the fraction of the dense peak a large bf16 GEMM of
  transformer shapes reaches in cuBLAS (public GEMM microbenchmarks on A100 and H100 land
  between 65% and 80% of the datasheet peak: clocks throttle under load, tiles quantize).
* ``attention_efficiency``: the fraction of the dense peak a fused attention kernel
  (forward and backward, head dim 128) reaches, the FLOPs of a causal mask's skipped half
  not counted. On the A100 the kernel is FlashAttention-2: 50-73% of the peak (Dao,
  "FlashAttention-2", 2023), so 0.6. On Hopper FlashAttention-2 reaches only 35% (Shah
  et al., "FlashAttention-3", 2024), and training stacks run FlashAttention-3 or cuDNN's
  fused attention there instead: FlashAttention-3's BF16 forward at head dim 128 runs at
  590-620 TFLOP/s for sequences of 2K-16K (PyTorch's benchmark suite, pytorch/benchmark
  #2391; up to 740, 75%, in the paper), 0.6-0.63 of the peak, and its backward 1.5-1.75
  times FlashAttention-2's, 0.5-0.6; weighted by the backward's 2.5 times the forward's
  FLOPs, 0.55. So 0.55 on H100 and H200 (one chip) and, for want of a published
  figure, on B200.
* ``hbm_efficiency`` 0.8: the fraction of the datasheet HBM bandwidth a streaming kernel
  reaches (STREAM-like copies on A100/H100 reach 80-90%).
* ``fuses`` (True on GPUs): memory-bound ops move the bytes a fusing stack moves
  (:mod:`lowering.schedule.fusion`), not every eager op's. GPU training at scale runs fused
  norms, rotary, SwiGLU and cross-entropy kernels (Megatron-LM, Transformer Engine) or
  ``torch.compile``; the ``cpu`` profile predicts shardlang's own eager CPU runs, so it
  counts every op (False).
* latencies per ring step, 2 us over NVLink and 8 us over the network: the order of
  NCCL's own tuning model (``src/graph/tuning.cc``: base and per-hop latencies of a few
  microseconds, higher over the network).
* ``cpu``: its FLOP/s and bandwidth are this machine's measurements (``shardlang
  calibrate`` measures them again), so its efficiencies are 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import shardlang as sl

__all__ = ["Device", "DEVICES", "device"]

GB, TB, T = 1e9, 1e12, 1e12


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: dict[str, float]   # dtype -> dense FLOP/s
    memory: float                  # bytes of device memory
    hbm_bw: float                  # bytes/s
    intra_node_bw: float           # bytes/s per GPU, one direction
    inter_node_bw: float           # bytes/s per GPU, one direction
    gpus_per_node: int
    sources: tuple[str, ...]
    #: the time model's efficiency factors and link latencies (module docstring)
    matmul_efficiency: float = 0.7
    attention_efficiency: float = 0.55
    hbm_efficiency: float = 0.8
    fuses: bool = True
    intra_node_latency: float = 2e-6
    inter_node_latency: float = 8e-6

    def peak(self, precision: str) -> float:
        return self.peak_flops["bf16" if precision == "bf16" else "fp32"]


DEVICES: dict[str, Device] = {d.name: d for d in (
    Device("a100-80gb", {"bf16": 312 * T, "fp32": 19.5 * T}, 80 * GB, 2.039 * TB,
           300 * GB, 25 * GB, 8,
           ("NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): BF16 312 TFLOPS dense, "
            "FP32 19.5 TFLOPS, HBM2e 2,039 GB/s, NVLink 600 GB/s bidirectional",
            "NVIDIA DGX A100 user guide: 8 GPUs, one 200 Gb/s HDR InfiniBand port per GPU"),
           attention_efficiency=0.6),
    Device("h100-80gb", {"bf16": 989 * T, "fp32": 67 * T}, 80 * GB, 3.35 * TB,
           450 * GB, 50 * GB, 8,
           ("NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 989 TFLOPS dense (1,979 "
            "with sparsity), FP32 67 TFLOPS, HBM3 3.35 TB/s, NVLink 900 GB/s bidirectional",
            "NVIDIA DGX H100 user guide: 8 GPUs, one 400 Gb/s NDR InfiniBand port per GPU")),
    Device("h200", {"bf16": 989 * T, "fp32": 67 * T}, 141 * GB, 4.8 * TB,
           450 * GB, 50 * GB, 8,
           ("NVIDIA H200 Tensor Core GPU datasheet (SXM): BF16 989 TFLOPS dense, FP32 67 "
            "TFLOPS, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s bidirectional",
            "NVIDIA DGX H200: 8 GPUs, one 400 Gb/s InfiniBand/Ethernet port per GPU")),
    Device("b200", {"bf16": 2250 * T, "fp32": 80 * T}, 180 * GB, 8 * TB,
           900 * GB, 50 * GB, 8,
           ("NVIDIA HGX B200 datasheet (1,000 W): BF16 2.25 PFLOPS dense (4.5 with "
            "sparsity), FP32 80 TFLOPS, HBM3e 8 TB/s, NVLink 5 1.8 TB/s bidirectional",
            "NVIDIA DGX B200 datasheet: 8 GPUs, 1,440 GB of GPU memory in all (180 GB "
            "each), one 400 Gb/s ConnectX-7 port per GPU")),
    Device("cpu", {"bf16": 229e9, "fp32": 88e9}, 24 * 2**30, 14.9 * GB,
           1 * GB, 1 * GB, 2,
           ("measured on this project's machine (2 cores, 24 GiB) on 2026-12-03, one "
            "thread per process as shardlang's launcher sets: torch.matmul of 2048x2048 "
            "matrices, 88 GFLOP/s fp32 and 229 GFLOP/s bf16; copy_ of a 256 MiB tensor, "
            "14.9 GB/s read + write",
            "links: gloo over loopback TCP; 1 GB/s is an order of magnitude, not a "
            "measurement"), matmul_efficiency=1.0, attention_efficiency=1.0,
           hbm_efficiency=1.0, fuses=False,
           intra_node_latency=50e-6, inter_node_latency=50e-6),
)}


def device(name: str) -> Device:
    """The profile called ``name``; a clear error listing the known ones."""
    key = name.strip().lower()
    if key not in DEVICES:
        raise sl.ShardingError(
            f"--device {name!r}: unknown device; the profiles are {', '.join(DEVICES)} "
            "(lowering/plan/devices.py, each figure with its source)")
    return DEVICES[key]
