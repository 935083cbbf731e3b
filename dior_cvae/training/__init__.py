"""Training-side code that is not shipped with the weights (the shipped remote code never imports it). One module
per job:

- `data`: readers (DailyDialog, PersonaChat, JSON Lines, `datasets`), encoding, tokenizers, length-grouped batches
- `sources`: the data, tokenizer and batches that train.py's arguments name
- `clean_split`, `eval_sets`, `tfidf`: the clean DailyDialog split and the evaluation sets
- `model_config`: DiorCVAEConfig's fields as arguments; the model to train
- `arguments`: train.py's argument checks, as tables
- `optimization`: KL annealing, the optimizer, learning-rate schedules
- `compiled`: the compiled training step, static batch shapes, deferred device read-back
- `checkpointing`: atomic folders, checkpoints with manifests, resume, pruning, the non-finite guard
- `evaluation`: validation losses, latent diagnostics, sampled responses, the best model
- `metrics`, `multiref`, `responders`, `likelihood`, `diagnostics`: response metrics, multi-reference metrics, baseline
  responders, importance-weighted likelihood, latent statistics
- `reporting`: logs, model card, training curves, Hub upload
- `trainer`: the 🤗 Trainer route (`DiorTrainer`, `KLAnnealingCallback`)

Importing this package imports none of its modules (they pull in torch, nltk, sentence-transformers lazily): import
from the modules (`from dior_cvae.training.data import load_dailydialog_dir`).
"""
