"""`python -m t2t_avg`: legacy avg_checkpoints flags, or t2t-avg-all's with --model_dir."""
from t2t_avg.cli import average

if __name__ == "__main__":
  average.run_main()
