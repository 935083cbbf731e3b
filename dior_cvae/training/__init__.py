"""Training Dior-CVAE (not shipped with saved models; the shipped remote code never imports it). One module per job:

- `data`: readers (DailyDialog, PersonaChat, JSON Lines, `datasets`), encoding, tokenizers, length-grouped batches
- `sources`: the data, tokenizer and batches that train.py's arguments name
- `model_config`: DiorCVAEConfig's fields as arguments; the model to train
- `optimization`: KL annealing, the optimizer, learning-rate schedules
- `compiled`: the compiled training step, static batch shapes, deferred device read-back
- `checkpointing`: atomic folders, checkpoints with manifests, resume, pruning, the non-finite guard
- `evaluation`: validation losses, latent diagnostics, sampled responses, the best model
- `metrics`, `diagnostics`: response metrics (BLEU, Distinct, ...) and latent statistics
- `reporting`: logs, model card, training curves, Hub upload
- `trainer`: the 🤗 Trainer route (`DiorTrainer`, `KLAnnealingCallback`)

Import from the modules (`from dior_cvae.training.data import load_dailydialog_dir`).
"""
