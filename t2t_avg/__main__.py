"""`python -m t2t_avg`: legacy avg_checkpoints flags, or t2t-avg-all's with --model_dir."""
from t2t_avg import cli

if __name__ == "__main__":
  cli.run_main()
