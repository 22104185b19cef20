"""Reading and writing models: Hugging Face directories, orbax checkpoints, paths and model ids."""
