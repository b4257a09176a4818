"""Evaluation: linear, k-shot, label-fraction and fine-tuning protocols with patient-level bootstrap CIs."""
