"""Averaging inside Keras 3 training: `from t2t_avg.keras import AverageCheckpoints`.

The callback lives in `t2t_avg.jobs.callback` (the only module of the
package that imports Keras); see its docstring and the README's "Inside
training".
"""
from t2t_avg.jobs.callback import AverageCheckpoints, recompute_batch_norm

__all__ = ["AverageCheckpoints", "recompute_batch_norm"]
