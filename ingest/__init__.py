"""Ingest: pack CXR datasets (CheXpert, NIH, MIMIC-CXR-JPG, DICOM, folders) into verified WebDataset shards."""
