"""Data sources: dataset discovery and splits (layout), image/DICOM reading (images), MedMNIST (medmnist)."""
