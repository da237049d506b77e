"""The model: EHRModel (a PreTrainedModel), its embeddings, pretraining objectives, model inputs."""
