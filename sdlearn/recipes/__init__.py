"""Training recipes: each module trains and saves one shipped model (python -m sdlearn.recipes.NAME --out ...)."""
