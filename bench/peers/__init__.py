"""The peers keyjobs is measured against, run in the bench's own venv (``.venv-bench``)."""
