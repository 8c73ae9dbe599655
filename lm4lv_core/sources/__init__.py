"""Where models come from: Hugging Face ids and named offline presets."""
