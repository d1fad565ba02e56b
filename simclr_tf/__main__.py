"""`python -m simclr_tf --flagfile=flags/<recipe>.cfg [--flag=value ...]`."""

from simclr_tf import cli

if __name__ == "__main__":
    cli.run_main()
