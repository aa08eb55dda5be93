"""Statistics, figures and the report, built only from the raw store (nothing boots here).

Installed as `dynamem.analysis` (`src/dynamem/analysis` is a symlink to this folder), so
the report, `dynamem compare` and the asv suite read results through one code path.
"""
