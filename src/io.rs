//! Reading and writing safetensors files of embeddings, targets, labels and results.
