"""spec-datagen."""
