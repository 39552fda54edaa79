"""The report: results.json schema, HTML report card, model card and leaderboard. Reads files only."""
