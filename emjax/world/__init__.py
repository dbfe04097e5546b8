"""A synthetic world with known ground truth (world.py), its text and questions (corpus.py), tokenizer and judge."""
