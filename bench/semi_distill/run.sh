#!/bin/bash
# bench/README.md, "Distillation on training queries without labels": 80% of the synthetic training queries
# unlabelled; teacher from the rest; students distilled on all of them vs contrastive on the labelled fifth.
# Work folder: outputs/semi_distill. About 25 min on 2 CPU cores. Resumable (the pipelines skip finished stages).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=outputs/semi_distill
python bench/semi_distill/prep.py $root 0.2
reprolib run bench/semi_distill/teacher.yaml --out $root --set teacher.weight=0.3
python bench/semi_distill/pseudo.py $root 0.2
python bench/semi_distill/agree.py $root 0.2
reprolib run bench/semi_distill/students.yaml --out $root
