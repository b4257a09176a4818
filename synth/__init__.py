"""Procedural chest X-ray phantoms and `ingest synth`'s CheXpert-layout generator; imports nothing of the project."""
