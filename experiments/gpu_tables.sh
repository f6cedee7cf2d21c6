#!/usr/bin/env bash
# The GPU figures of experiments/README.md ("On an H200"), from the repository root of a
# machine with a CUDA JAX and torch but without this project's other dependencies:
#
#   bash experiments/gpu_tables.sh smoke OUTDIR   # install, versions, one tiny step on the GPU
#   bash experiments/gpu_tables.sh main OUTDIR    # the WRN-28-2 paper-batch tables
#   bash experiments/gpu_tables.sh ggcr OUTDIR    # GGCR with patches rebuilt or kept, the
#                                                 # second backward's cost, csr vs official
#   bash experiments/gpu_tables.sh sketch OUTDIR  # per-sample vlr, the sketch in chunks of
#                                                 # 4 and 2, digits sketch seeds 3-4
#   bash experiments/gpu_tables.sh chunks OUTDIR  # exact GGCR on FixMatch's forward and
#                                                 # with its own, in 8 and 16 chunks, the
#                                                 # pair fraction with the base statistics,
#                                                 # the step's per-operation profile
#
# Wheels of the missing pure dependencies (grain, ml-collections, tensorflow-datasets, ...)
# and of ggr_jax itself lie in .whl/ (pip download / pip wheel on a networked machine); a
# checkout of the official code (github.com/JiaheChen2002/GGR, or the files
# experiments/vs_official.py reads) lies in .official/. Every stage prints as it goes and
# has its own time limit, so a stage cut short still leaves its finished rows in OUTDIR.
set -u
stage=${1:?smoke, main, ggcr, sketch or chunks}
out=${2:?output folder}
mkdir -p "$out"; out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ ! -d /tmp/site/ggr_jax ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site
repo=$(pwd)
cd /tmp  # so that the installed ggr_jax (with its configs) is imported, not the source folder
ggr="python3 -m ggr_jax.cli"

if [ "$stage" = smoke ]; then
  nvidia-smi -L
  python3 -c "import jax, flax, optax, orbax.checkpoint as o, numpy, torch; \
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, \
'numpy', numpy.__version__, 'torch', torch.__version__, jax.devices())"
  timeout 100 $ggr bench --workloads tiny --algorithms fixmatch --variants sum,vlr --steps 5 \
    --warmup 2 --isolate no 2>&1 | tee "$out/smoke.txt"
  exit
fi

if [ "$stage" = ggcr ]; then
  # 1. sum_split (both gradients, no projection) against sum (one backward): what the
  #    second backward costs; GGCR's fast exact step with its patches rebuilt (the
  #    default) and kept, and the chunked sketch (about 50 s per cell, compile included)
  timeout 300 $ggr bench --workloads wrn28_2_paper --algorithms fixmatch \
    --variants sum,sum_split,ggcr_fast,ggcr_fast_keep_patches,ggcr_sketch_k64_chunk8 \
    --steps 10 --warmup 2 --json "$out/bench_wrn28_2_paper_ggcr.json" 2>&1 \
    | grep -v cuda_timer | tee "$out/bench_ggcr.txt"
  # 2. csr k=10 beside the official step (left out of the main stage)
  timeout 120 python3 "$repo/experiments/vs_official.py" --official "$repo/.official" \
    --device cuda --batch paper --losses fixmatch --variants csr --rounds 1 --steps 10 \
    --warmup 2 --json "$out/vs_official_cuda_paper_csr.json" 2>&1 | grep -v cuda_timer \
    | tee "$out/vs_official_csr.txt"
  exit
fi

if [ "$stage" = chunks ]; then
  # exact GGCR on FixMatch's own forward (statistics "through", the default; XLA counts
  # 3.04x FixMatch's FLOPs) and on a forward of its own ("held", 3.70x), on every pair in
  # chunks one after the other (consistency.pair_chunks; 8 and 16 chunks planned on the
  # CPU at 1.56x and 1.28x FixMatch's memory), and the pair fraction's final version
  timeout 420 $ggr bench --workloads wrn28_2_paper --algorithms fixmatch \
    --variants sum,ggcr_fast,ggcr_fast_held,ggcr_fast_chunks16,ggcr_fast_chunks8,ggcr_fast_eighth,ggcr_fast_quarter \
    --steps 10 --warmup 2 --json "$out/bench_wrn28_2_paper_chunks.json" 2>&1 \
    | grep -v cuda_timer | tee "$out/bench_chunks.txt"
  # where the GPU step's time goes (ggr_jax.step_profile), FixMatch and FixMatch + GGR vlr
  timeout 120 $ggr bench --workloads wrn28_2_paper --algorithms fixmatch --variants sum,vlr \
    --steps 5 --warmup 2 --profile 20 --json "$out/profile_wrn28_2_paper.json" 2>&1 \
    | grep -v cuda_timer | tee "$out/profile.txt"
  exit
fi

if [ "$stage" = sketch ]; then
  # 1. per-sample vlr by JVP (the anchor's products shared by the diagnostics and the
  #    rectifier, 2026-12-04) beside vlr, and GGCR's sketch with 4 and 2 directions a pass
  timeout 330 $ggr bench --workloads wrn28_2_paper --algorithms fixmatch \
    --variants sum,vlr,vlr_per_sample_jvp,ggcr_sketch_k64_chunk4,ggcr_sketch_k64_chunk2 \
    --steps 10 --warmup 2 --json "$out/bench_wrn28_2_paper_sketch.json" 2>&1 \
    | grep -v cuda_timer | tee "$out/bench_sketch.txt"
  # 2. the digits GGCR sweep's sketch cells of seeds 3 and 4 (28x the exact method's time
  #    on the CPU), and the exact cells of the same seeds to show what the device changes
  timeout 200 $ggr sweep "$repo/experiments/sweeps/digits_closed_ggcr.py" --root /tmp/sweep \
    --only ggcr_sketch64-s3 --only ggcr_sketch64-s4 --only ggcr_exact-s3 \
    --only ggcr_exact-s4 2>&1 | grep -v cuda_timer | tail -40 | tee "$out/sweep.txt"
  (cd /tmp/sweep && find . -maxdepth 2 \( -name 'results.*' -o -name summary.json \
    -o -name metrics.jsonl -o -name log.txt \) -exec cp --parents {} "$out/" \;)
  exit
fi

# 1. ggr_jax's step on the paper batch (64 labeled + 448 weak + 448 strong): the rectifier
#    variants and GGCR's three geometries, each cell in its own process (peak memory)
#    (2026-12-04: about 45 s per cell, compile included; ggcr_vmap's compile took over
#    80 s and ran out of time, so it comes last; the report is rewritten after each row)
timeout 330 $ggr bench --workloads wrn28_2_paper --algorithms fixmatch \
  --variants sum,vlr,ggcr_fast,ggcr_sketch_k64_chunk8,vlr_labeled,vlr_per_sample_jvp,ggcr_vmap \
  --steps 10 --warmup 2 --json "$out/bench_wrn28_2_paper.json" 2>&1 \
  | grep -v cuda_timer | tee "$out/bench.txt"
# 2. the official PyTorch step beside it, same batch, same GPU (about 40 s per variant)
timeout 200 python3 "$repo/experiments/vs_official.py" --official "$repo/.official" --device cuda \
  --batch paper --losses fixmatch --variants plain,vlr,osr,csr --rounds 1 --steps 10 --warmup 2 \
  --json "$out/vs_official_cuda_paper.json" 2>&1 | grep -v cuda_timer | tee "$out/vs_official.txt"
