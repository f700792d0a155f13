"""The tutorials run end to end on CPU, and print the lesson's key results."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run_tutorial(name: str) -> str:
    """Run ``tutorials/NAME`` as a script from the repository root; return its stdout."""
    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tutorials" / name)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return ANSI.sub("", proc.stdout)


def test_01_sharded_matmul() -> None:
    out = run_tutorial("01_sharded_matmul.py")
    for label in ("case 1", "case 2", "case 2 + all_gather", "case 3", "case 3 + psum_scatter",
                  "case 3 on tp=4", "case 4", "case 2 backward", "case 3 backward",
                  "case 1 backward"):
        assert f"\n{label}: result matches x @ w (max error" in out, label
    # the collective each case needs (and cases 1, 2 and 4 need none)
    assert out.count("collectives: none") == 3
    assert "collectives: forward all_gather over tp" in out
    assert out.count("collectives: forward all_reduce over tp") == 3  # case 3, tp=4, backward
    assert "collectives: forward reduce_scatter over tp" in out
    assert "collectives: backward all_reduce over tp" in out
    assert "collectives: backward all_reduce over dp" in out
    # specs derived from the rules
    assert "x (8, 16): logical axes ('batch', 'k') -> spec P(None, 'tp')" in out
    assert "w (16, 12): logical axes ('k', 'n') -> spec P(None, 'tp')" in out
    assert "placements (Shard(dim=0), Shard(dim=1))" in out
    assert "each of the 4 ranks holds its (4, 6) block of y" in out
    # the forgotten psum is caught
    assert "ShardingError: shard_map(matmul) output 0 varies over mesh axis 'tp'" in out
    # wire bytes by the ring formulas
    assert "wire bytes: all-reduce 384 B, reduce-scatter 192 B (50%)" in out
    assert "tp=4: payload 384 B, 2*(4-1)/4*384 = 576 B, recorded 576 B" in out
    # backward: Megatron's f and g
    assert "backward all-reduces over tp: 1, of shape [8, 16] = the shape of x [8, 16]" in out
    assert "psum: 1 forward and 0 backward collectives" in out


def test_02_data_and_tensor_parallel() -> None:
    out = run_tutorial("02_data_and_tensor_parallel.py")
    assert "gpt-tiny: 216,192 parameters = 864,768 B in fp32" in out
    # (a) DP
    assert "placements of the 44 parameters: {'(Replicate(),)': 44}" in out
    # one bucket: the parameters in reverse order, from the last (ln_f) to the first (wte)
    assert ("1 gradient all-reduce(s) over dp (phase: backward), payloads sum to 864,768 B; "
            "site 'grads ln_f.bias .. wte.weight'") in out
    assert "with bucket_kb=0 (--bucket-kb 0): 44 all-reduces, one per parameter" in out
    assert "= 216,192 parameters * 4 B = 864,768 B: equal" in out
    # (b) TP
    assert re.search(r"blocks\.0\.attn\.q\.weight .* column-parallel", out)
    assert re.search(r"blocks\.0\.mlp\.down\.weight .* row-parallel", out)
    for i in range(4):
        assert (f"blocks.{i}: 2 forward + 2 backward all-reduces over tp, payload {{65536}} B "
                "= b*s*h*4") in out
    # (c) FSDP
    assert ("per unit (4 layers of the stack, 3 outside it: wte, wpe, ln_f): 1 all-gather "
            "forward, 1 all-gather backward, 1 reduce-scatter: yes") in out
    assert re.search(r"blocks\.0's gather carries [\d,]+ B = its \d+ parameters' [\d,]+ B: "
                     r"equal", out)
    # psi: 216,192 parameters * 4 B (the tied head once)
    assert "3(n-1)/n * psi = 3*1/2 * 864,768 = 1,297,152 B; recorded 1,297,152 B" in out
    # recorded vs analytic wire bytes: dp (a), tp (b), dp (c), dp and tp (d)
    assert out.count("-> exact") == 5 and "MISMATCH" not in out
    # (d) DP x TP: the dp bucket holds the tp blocks: 216,192 minus half the split weights
    assert "the dp bucket carries this rank's tp blocks of the gradients: 109,696 values" in out
    # every rank has the same loss each step, and matches one device
    steps = re.findall(r"step (\d): loss per rank ([\d.]+), \2, \2, \2\n", out)
    assert [s for s, _ in steps] == ["0", "1", "2"]
    assert "every one of the 4 ranks matches the single-device model" in out


def test_04_expert_parallel_moe() -> None:
    out = run_tutorial("04_expert_parallel_moe.py")
    # (a) experts sharded over ep, the router replicated
    assert re.search(r"blocks\.1\.mlp\.w_up +\(4, 64, 256\) +P\('ep', None, 'tp'\) +"
                     r"\(Shard\(dim=0\),\)", out)
    assert ("ep rank 1 holds experts [2, 3]: expert e lives on rank e // (n_experts/ep) = e // 2"
            in out)
    # (b) routing: each rank sends all its k*T = 256 choices somewhere; counts agree
    sends = re.findall(r"rank (\d) -> rank 0: (\d+), rank 1: (\d+)", out)
    assert [r for r, _, _ in sends] == ["0", "1"]
    assert all(int(a) + int(b) == 256 for _, a, b in sends)
    assert re.search(r"tokens per expert, from this routing: \[[\d, ]+\]; simulate\(ep=2\) "
                     r"reports moe1.tokens_per_expert \[[\d, ]+\]: equal", out)
    # (c) capacity: nothing drops at cf >= ... n_experts/k, and simulate agrees when it does
    assert re.search(r"2\.0 \| T=128, C=128, dropped   0 .* T= 64, C= 64, dropped   0", out)
    assert re.search(r"0\.5 \| T=128, C= 32, dropped 256 \(50\.0%\)", out)
    assert len(re.findall(r"at cf=1\.0 reports moe1\.dropped = (\d+), computed here \1: equal",
                          out)) == 2
    # (d) the balance loss is global: equal on every layout; training matches one device
    assert out.count("reports moe1.balance") == 2 and "DIFFERENT" not in out
    assert len(re.findall(r"step \d: loss [\d.]+ on every one of the 4 ranks", out)) == 3
    assert "ep=2 and dp=2 x ep=2 match the single-device model" in out
    # (e) 2 + 2 all-to-alls per MoE layer, payload n_experts * C * width * 4
    assert out.count("= 2 forward + 2 backward all-to-alls of 131,072 B") == 2
    assert out.count("= 2 forward + 2 backward all-to-alls of 65,536 B") == 2
    assert out.count("all-to-alls outside the MoE layers: 0") == 2


def test_03_sequence_parallel_ring_attention() -> None:
    out = run_tutorial("03_sequence_parallel_ring_attention.py")
    # (a) the ring, from real permutes: owner = (rank - step) mod n; causal visibility
    assert "The traced function issued 3 permutes over sp for 4 steps (shift [1])." in out
    assert "owner = (rank - step) mod 4 in every cell: yes" in out
    assert re.search(r"0 \| K/V 0 diagonal +36 \| K/V 1 diagonal +36 \| K/V 2 diagonal +36 "
                     r"\| K/V 3 diagonal +36", out)
    assert re.search(r"3 \| K/V 1 masked +0 \| K/V 2 masked +0 \| K/V 3 masked +0 "
                     r"\| K/V 0 full +64", out)
    assert re.search(r"sum \| +36 \| +100 \| +164 \| +228\n", out)
    # (b) ring attention equals SDPA; n-1 permutes each way of 2*b*h*(s/n)*d*4 bytes
    err = re.search(r"ring attention matches scaled_dot_product_attention \(max error (\S+)\)",
                    out)
    assert err and float(err.group(1)) < 1e-5
    for phase in ("forward", "backward"):
        assert (f"{phase}: 3 permutes over sp of [4096] B; 2*b*h*(s/n)*d*4 = 2*2*4*8*8*4 "
                "= 4096 B: equal") in out
    # (c) load balancing evens the causal work; the model still matches one device
    assert "rank 0: 36, rank 1: 100, rank 2: 164, rank 3: 228; max/min 6.33" in out
    assert "rank 0: 132, rank 1: 132, rank 2: 132, rank 3: 132; max/min 1.00" in out
    assert "rank 0: tokens 0-3 + 28-31" in out and "rank 3: tokens 12-15 + 16-19" in out
    assert "same total work: 528 = 528: yes" in out
    assert "gpt-tiny on Mesh(sp=2), load_balance=True: parity ok = True" in out
    # (d) Megatron-SP: AG + RS instead of AR, same wire bytes, still exact
    assert re.search(r"plain TP: norm_seq -> 'sp'; blocks.0 issues\n  forward  2 x all_reduce\n"
                     r"  backward 2 x all_reduce\n", out)
    assert re.search(r"Megatron-SP: norm_seq -> 'tp'; blocks.0 issues\n"
                     r"  forward  2 x all_gather\n  forward  2 x reduce_scatter\n"
                     r"  backward 2 x all_gather\n  backward 2 x reduce_scatter\n", out)
    assert "blocks.0 wire bytes: plain TP 262,144 B, Megatron-SP 262,144 B: equal" in out
    assert "gpt-tiny on Mesh(tp=2), Megatron-SP: parity ok = True" in out
    assert "NOT EQUAL" not in out


def test_05_pipeline_schedules() -> None:
    out = run_tutorial("05_pipeline_schedules.py")
    p, m, v = 4, 8, 2
    # (a) the layer stack split over pp: consecutive layers, embedding first, head last
    assert "self.blocks = sl.axes(nn.ModuleList(" in out and '"layers")' in out
    assert "pp rank 0: chunks [0] -> layers [[0, 1]] + embedding (wte, wpe)\n" in out
    assert "pp rank 1: chunks [1] -> layers [[2, 3]] + final norm, head and loss\n" in out
    assert "pp rank 2: chunks [2] -> layers [[2]]\n" in out
    assert "pp rank 1: chunks [1, 3] -> layers [[1], [3]] + final norm, head and loss\n" in out
    assert out.count("every layer on exactly one pipeline rank: yes") == 3
    # (b) Gantt charts: every rank does m*v forwards and m*v backwards, and idles 2(p-1)
    for name, vv in (("gpipe", 1), ("1f1b", 1), ("interleaved", v)):
        chart = out.split(f"\n{name} (pp={p}, m={m}, v={vv}):\n", 1)[1]
        rows = [ln.strip() for ln in chart.splitlines()[:p]]
        assert [r.split(" ")[0] for r in rows] == [f"pp={r}" for r in range(p)]
        cells = [r.split("|")[1:-1] for r in rows]
        assert all(sum(c.startswith("F") for c in cs) == m * vv for cs in cells), name
        assert all(sum(c.startswith("b") for c in cs) == m * vv for cs in cells), name
        assert all(cs.count("..") == 2 * (p - 1) for cs in cells), name
        # the bubbles: the formula computed here, the timeline as idle cells of the chart
        theory = (p - 1) / (m + p - 1) / vv
        idle = sum(cs.count("..") for cs in cells) / sum(len(cs) for cs in cells)
        line = re.search(rf"  {name} bubble: theory .* = ([\d.]+) \(.*\); timeline ([\d.]+) ",
                         out)
        assert line, name
        assert float(line.group(1)) == round(theory, 4), name
        assert float(line.group(2)) == round(idle, 4), name
    # GPipe and 1F1B idle the same; interleaving is below the formula's (p-1)/(m+p-1)
    assert "gpipe bubble: theory (p-1)/(m+p-1) = 3/11 = 0.2727 (27.3%); timeline 0.2727" in out
    assert "1f1b bubble: theory (p-1)/(m+p-1) = 3/11 = 0.2727 (27.3%); timeline 0.2727" in out
    assert "interleaved bubble: theory (p-1)/(m+p-1)/v = 3/11/2 = 0.1364" in out
    assert (f"(p-1)/(v*m+p-1) = 3/19 = {(p - 1) / (v * m + p - 1):.4f}: equal to the timeline"
            in out)
    # activation memory: GPipe keeps all m alive, 1F1B p - rank
    assert f"gpipe activations alive per rank: {[m] * p}" in out
    assert f"1f1b activations alive per rank: {[p - r for r in range(p)]}" in out
    assert (f"gpipe 48, 1f1b 48 (2*m*(p-1) = {2 * m * (p - 1)}), interleaved 112 "
            f"(2*m*(p*v-1) = {2 * m * (p * v - 1)})") in out
    # (c) the bubble against m: formula (computed here) = timeline; 1F1B only from m = p
    for mm in range(1, 17):
        want = f"{(p - 1) / (mm + p - 1):.4f}"
        row = re.search(rf"\n +{mm} \| +(\S+) \| +(\S+) \| +(\S+)\n", out)
        assert row, mm
        assert row.group(1) == row.group(2) == want, mm
        assert row.group(3) == (want if mm >= p else "-"), mm
    # (d) the recorded boundary traffic: m sends and m receives per direction of b*s*h*4 B
    assert "4 sends and 4 receives of microbatch*seq*width*4 = 8*32*64*4 = 65,536 B" in out
    assert "activations rank 0 -> rank 1: 4 sends, 4 receives of [65536] B: equal" in out
    assert "gradients   rank 1 -> rank 0: 4 sends, 4 receives of [65536] B: equal" in out
    assert out.count("pipeline 0->1 (activation, microbatch") == 8   # rank 0 sends, 1 receives
    assert out.count("pipeline 0->1 (gradient, microbatch") == 8
    assert len(re.findall(r"forward  send to rank 1 +pipeline 0->1 \(activation, microbatch "
                          r"\d\) +\(8, 32, 64\) 65,536 B", out)) == 4
    assert "actions(pipe, 0)'s sends and receives: yes" in out
    assert "actions(pipe, 1)'s sends and receives: yes" in out
    # ... and the pipelined step matches one device
    assert re.search(r"worst gradient error \S+ in \S+ on rank \d; worst loss error \S+", out)
    assert ("gpt-tiny on Mesh(pp=2), 1f1b, m=4: parity ok = True; "
            "the pipelined run matched one device") in out
    assert "NOT EQUAL" not in out and "MISMATCH" not in out and "NOT the timeline" not in out
