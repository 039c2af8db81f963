"""A metabench plug-in: the BOIL learner, a small backbone and a generated dataset, registered from outside
metabench through entry points (see pyproject.toml); nothing in metabench names them."""
