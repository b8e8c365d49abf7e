"""The demo's material: its synthetic dataset (`dataset`) and the small model `qrun demo` trains on
it (`build`). Nothing here is on a job's path: the workers never import it.
"""
