"""(CPU, here) The engine's host time per decode step, with the model replaced by a stub
that returns logits at once: what scheduling, input building, feeding and collecting
cost per step at a batch (issue 18's "host time per step at batch 256 under 1 ms").
Treats every step as a graph step (the GPU's decode path, replays stubbed). Prints the time and a
cProfile of 100 steps. `stop`: every request has a stop string (one that never occurs);
`sampled`: every request samples (temperature 0.8, top-p 0.95).

    .venv/bin/python benchmarks/host_cpu.py 256 [stop|sampled]
"""
import time, torch, cProfile, pstats, sys
from dwc.runtime.engine import Engine, EngineConfig
from dwc.runtime.sequence import SamplingParams
eng = Engine("examples/stdlib-coder/checkpoint", EngineConfig(device="cpu", num_blocks=8192, max_num_seqs=512, max_num_batched_tokens=8192))
# The GPU's decode path with the replays stubbed: real DecodeGraphs input handling (the
# host table, the feed, advancing the last step), outputs of 8 logits (an argmax on the
# GPU is one launch; over the real vocabulary on this CPU it would dominate).
from dwc.runtime.cuda_graphs import DecodeGraphs
g = DecodeGraphs(None, [torch.zeros(1)], eng.blocks.block_size, 64, len(eng.blocks.blocks), 512)
g._pad_from(0)
for size in g.sizes:
    g.graphs[size] = type("Replay", (), {"replay": lambda self: None})()
    g.outputs[size] = torch.zeros(size, 8)
    g.outputs[size][:, 5] = 1  # token 5: not the example's EOS (0), as most tokens are not
eng.runner.graphs = g
B = int(sys.argv[1])
stop = ["\u2603 never"] if sys.argv[2:] == ["stop"] else []
temp = 0.8 if sys.argv[2:] == ["sampled"] else 0.0
seqs = [eng.add([10 + (i * 7 + j) % 4000 for j in range(128)], SamplingParams(max_tokens=400, ignore_eos=True, stop=stop, temperature=temp, top_p=0.95 if temp else 1.0)) for i in range(B)]
while any(s.num_computed < 128 for s in seqs): eng.step()
for _ in range(5): eng.step()
t = time.perf_counter(); N = 100
pr = cProfile.Profile(); pr.enable()
for _ in range(N): eng.step()
pr.disable()
print(f"batch {B}: host ms per step {(time.perf_counter()-t)/N*1e3:.3f} (profiled)")
t = time.perf_counter()
for _ in range(N): eng.step()
print(f"batch {B}: host ms per step {(time.perf_counter()-t)/N*1e3:.3f}")
pstats.Stats(pr).sort_stats("tottime").print_stats(14)
