"""What goes into the model: images, prompts, datasets."""
