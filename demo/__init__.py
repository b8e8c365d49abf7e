"""Demo and test material: tiny models and tokenizers built on the spot, and the demo dataset.

Nothing here is on a job's path: qrun's workers never import it.
"""
