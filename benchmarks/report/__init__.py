"""Reading records back: the leaderboard (tables, verdicts, Markdown, CSV, HTML, the README's reproductions block)
and the terminal comparison table."""
