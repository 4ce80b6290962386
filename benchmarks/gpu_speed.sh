#!/usr/bin/env bash
# The GPU check of issue 21, one script planned to fit a lent GPU's 15 minutes (an estimate until it runs on one): on a random-weight
# model of SD 1.5's sizes at 512 px (conceptkit.models.fixtures.build_sd15_width, built once), float32,
#   1. a TI step and a LoRA step, `learn ti` / `learn lora` against diffusers' textual_inversion.py and
#      train_dreambooth_lora.py (benchmarks/train_speed_vs_diffusers.py: wall s/step, peak GPU memory in use);
#   2. a CLoRA image (2 LoRAs, 30 steps) against the official code's structure (benchmarks/clora_speed.py);
#   3. a fusion image and PromptNet's fine-tune against the official code's execution (benchmarks/profusion_speed.py).
# Each section writes its table under OUT as soon as it ends, so a run cut short still returns what it finished.
# SDXL width at 1024 px is left out: a 2.6B-parameter random UNet's build and 8 training runs do not fit beside
# the above in 15 minutes; run train_speed_vs_diffusers / clora_speed on an SDXL folder on their own for it.
#
#   bash benchmarks/gpu_speed.sh SCRIPTS [OUT]        # SCRIPTS: the two diffusers scripts, unmodified
#   MODEL=toy DEVICE=cpu bash benchmarks/gpu_speed.sh SCRIPTS /tmp/dry   # the same sections on the bundled model:
#                                                     # a dry run on a CPU, to check the script before a GPU is lent
#
# On a lent machine (the device tool): its python3 holds torch with CUDA but not diffusers, so carry the locked
# versions as wheels. Here, in the repository's root, once:
#   echo /.whl/ >> .git/info/exclude; echo /.gpu-scripts/ >> .git/info/exclude
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1 \
#       transformers==5.23.0 huggingface-hub==2.4.0 peft==0.21.2 accelerate==1.16.0 open_clip_torch==3.3.0
#   mkdir .gpu-scripts   # and put textual_inversion.py and train_dreambooth_lora.py there
# then run `bash benchmarks/gpu_speed.sh .gpu-scripts $OUT` with carry [".whl", ".gpu-scripts"] (about 23 MB of
# wheels beside the 32 MB checkout, under the 64 MiB a call carries): a .whl folder is installed to /tmp/site first.
set -euo pipefail
scripts=${1:?usage: bash benchmarks/gpu_speed.sh SCRIPTS [OUT] (SCRIPTS: the folder of textual_inversion.py and train_dreambooth_lora.py)}
out=${2:-${OUT:-gpu-speed}}
if [ -x .venv/bin/python ]; then py=${PYTHON:-.venv/bin/python}; else py=${PYTHON:-python3}; fi
if [ -d .whl ] && [ ! -x .venv/bin/python ]; then  # a lent machine: its python3 plus the carried wheels
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
device=${DEVICE:-cuda}
model=${MODEL:-sd15}
threads=${THREADS:-8}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=$threads HF_HUB_OFFLINE=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

{ date; nvidia-smi || echo "no nvidia-smi"; "$py" -c 'import torch; print("torch", torch.__version__)'; } > "$out/machine.txt" 2>&1
began=$SECONDS
if [ "$model" = sd15 ]; then
    folder="$work/sd15"
    "$py" -c "from conceptkit.models.fixtures import build_sd15_width; build_sd15_width('$folder')"
    echo "built the SD 1.5-sized folder in $((SECONDS - began)) s" | tee "$out/build.txt"
else
    folder=$model
fi

"$py" benchmarks/train_speed_vs_diffusers.py --scripts "$scripts" --model "$folder" --device "$device" \
    --threads "$threads" --steps-short 5 --steps-long 45 --rounds 1 --json "$out/train.json" \
    > "$out/train.md" 2> "$out/train.log"
echo "train: done at $((SECONDS - began)) s" | tee -a "$out/progress.txt"

"$py" benchmarks/clora_speed.py --models "$folder" --loras 2 --device "$device" --threads "$threads" --images 1 \
    > "$out/clora.md" 2> "$out/clora.log"
echo "clora: done at $((SECONDS - began)) s" | tee -a "$out/progress.txt"

"$py" benchmarks/profusion_speed.py --model "$folder" --device "$device" --threads "$threads" --steps 30 --batch 2 \
    --repeats 1 --json "$out/profusion.json" > "$out/profusion.md" 2> "$out/profusion.log"
echo "profusion: done at $((SECONDS - began)) s" | tee -a "$out/progress.txt"
cat "$out"/train.md "$out"/clora.md "$out"/profusion.md
