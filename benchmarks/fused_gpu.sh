#!/bin/bash
# The device check of fused sweeps (issue 17) on a lent GPU machine, from the repository root:
#   the fused launcher's CUDA paths (LeNets differing in lr, activation and dropout vs their lone runs;
#   a bf16 ResNet-20 group; fuse=auto is the wide form there; LeNets without dropout through the captured
#   CUDA graph vs the same group eager), one fused step's time and ops, alone vs vmap vs wide vs wide as a
#   CUDA graph (benchmarks/fused_step.py), then benchmarks/sweep.py
#   at CIFAR size. Pure-Python wheels the machine lacks
#   (hydra-core, omegaconf, antlr4, torchinfo, hydra-joblib-launcher) travel in .whl/ (gitignored), made here with
#   `pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl hydra-core==1.3.2
#   omegaconf==2.3.0 torchinfo hydra-joblib-launcher` and `pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3`
#   (no wheel on PyPI).
#   Env: DEV (cuda), FUSE (auto), N (training images, 50000), LONG (epochs of the long fused run, 20),
#   BENCH_S (time cap of the benchmark, s), PARTS (benchmark tables, in order), OUT (where the tables go),
#   RN (ResNet-18 training images, N), STAGES (which of smoke,step,bench to run: two calls can split them).
#   Within 15 minutes of device time, two calls on one warm machine fit (the second within its 30 s idle):
#     STAGES=smoke,step,bench PARTS=long BENCH_S=250 (timeout ~380), then STAGES=bench PARTS=grid BENCH_S=330
#     (timeout ~360): 251 s and 243 s on 2026-11-27; the ResNet-18 rows (PARTS=resnet RN=25000, ~90 s) met
#     their goal on 2026-11-27 and can wait.
#     Each sweep's directory is cleared before it is timed (benchmarks/sweep.py).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
DEV=${DEV:-cuda}
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null
python3 -c "import torch;print(torch.__version__, torch.cuda.is_available())"
STAGES=${STAGES:-smoke,step,bench}
S=/tmp/smoke; rm -rf $S; mkdir -p $S
if [[ $STAGES == *smoke* ]]; then
G="-m +debug=smoke trainer.device=$DEV optimizer.lr=0.1,0.05 model.activation=relu,tanh model.dropout=0,0.3"
python3 -m cnnlab $G hydra/launcher=fused hydra.launcher.fuse=${FUSE:-auto} hydra.sweep.dir=$S/fused > $S/fused.log 2>&1; echo "fused rc=$?"
python3 -m cnnlab $G hydra.sweep.dir=$S/alone > $S/alone.log 2>&1; echo "alone rc=$?"
python3 -m cnnlab -m +debug=smoke trainer.device=$DEV model=resnet20 trainer.precision=bf16 trainer.seed=0,1 hydra/launcher=fused hydra.launcher.fuse=${FUSE:-auto} hydra.sweep.dir=$S/resnet > $S/resnet.log 2>&1; echo "resnet rc=$?"
# without dropout the fused step is a CUDA graph (fused/graph.py): against the same group stepping eagerly, both
# with trainer.deterministic=true (cudnn's autotuning picks kernels per process, and its summation order alone
# sends the relu + cross-entropy members apart, eager run against eager run: measured 2026-11-27)
Q="-m +debug=smoke trainer.device=$DEV trainer.deterministic=true dataset.train_size=3000 optimizer.lr=0.1,0.05 model.activation=relu,tanh loss=mse,cross_entropy hydra/launcher=fused"
python3 -m cnnlab $Q hydra.sweep.dir=$S/graph > $S/graph.log 2>&1; echo "graph rc=$?"
python3 -m cnnlab $Q hydra.launcher.cuda_graphs=false hydra.sweep.dir=$S/eager > $S/eager.log 2>&1; echo "eager rc=$?"
set -o pipefail  # the checks' output is kept in $OUT/smoke.txt; a failed check still stops here
python3 - <<'PY' 2>&1 | tee $OUT/smoke.txt || { tail -n 30 $S/*.log; exit 4; }
import json, glob, math, os
S = "/tmp/smoke"
def runs(d): return {os.path.basename(os.path.dirname(p)): json.load(open(p)) for p in glob.glob(f"{S}/{d}/*/summary.json")}
f, a, r, g, e = runs("fused"), runs("alone"), runs("resnet"), runs("graph"), runs("eager")
print("fused", {k: (v["status"], v["device"], (v.get("fused_group") or {}).get("mode"), v.get("final_val_acc")) for k, v in f.items()})
print("alone", {k: (v["status"], v.get("final_val_acc")) for k, v in a.items()})
print("resnet", {k: (v["status"], v["precision"], (v.get("fused_group") or {}).get("mode")) for k, v in r.items()})
print("graph", {k: (v["status"], v["fused_group"], v.get("final_val_acc"), v.get("final_train_loss")) for k, v in g.items()})
print("eager", {k: (v["status"], v["fused_group"], v.get("final_val_acc"), v.get("final_train_loss")) for k, v in e.items()})
assert len(f) == 8 and all(v["status"] == "completed" and v["fused_group"]["mode"] == "wide" for v in f.values())
assert len(r) == 2 and all(v["status"] == "completed" for v in r.values())
print("max val acc diff fused vs alone, members without dropout", max(abs(f[k]["final_val_acc"] - a[k]["final_val_acc"]) for k in f if k.endswith("dropout-0")))
assert len(g) == 8 and all(v["status"] == "completed" and v["fused_group"]["graph"] for v in g.values())
assert len(e) == 8 and all(v["status"] == "completed" and not v["fused_group"]["graph"] for v in e.values())
print("max val acc diff graph vs eager", max(abs(g[k]["final_val_acc"] - e[k]["final_val_acc"]) for k in g))
gaps = [abs(g[k]["final_train_loss"] / e[k]["final_train_loss"] - 1) for k in g]
print("max train loss rel diff graph vs eager", max(gaps))
assert all(math.isfinite(x) and x < 1e-4 for x in gaps)  # max() would pass over a NaN
PY
cp $S/fused/0_*/train.log $OUT/smoke_member_train.log 2>/dev/null; cp $S/graph/0_*/train.log $OUT/smoke_graph_train.log 2>/dev/null
fi
if [[ $STAGES == *step* ]]; then
{ for o in sgd adam; do python3 -m benchmarks.fused_step --device $DEV --optimizer $o --steps 50; done; } 2>&1 | tee $OUT/fused_step.txt
fi
if [[ $STAGES == *bench* ]]; then
timeout ${BENCH_S:-470} python3 -m benchmarks.sweep --device $DEV --train-size ${N:-50000} --test-size 10000 --epochs 3 \
  --long-epochs ${LONG:-20} --jobs 4 --resnet-train-size ${RN:-${N:-50000}} --peak-tflops 989 --parts ${PARTS:-long,resnet,grid} --out $OUT --work /tmp/bw 2>&1 | tee $OUT/bench.log
# every run's metrics.csv, summary.json and train.log, and each sweep's console (ms timestamps): where the time
# went, also after a time cap
(cd /tmp/bw && find . \( -name metrics.csv -o -name summary.json -o -name train.log -o -name console.log \) -print0 |
  tar -czf $OUT/runs.tgz --null -T -)
fi
