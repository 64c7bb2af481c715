"""`python -m t2t_avg.compare A B`: compares two checkpoints variable by variable.

The comparison itself is `t2t_avg.jobs.compare`; its command line is
`t2t_avg.cli.compare`.
"""
from t2t_avg.cli import compare

if __name__ == "__main__":
  compare.run()
