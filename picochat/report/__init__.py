"""The run report card: markdown + plots summarising every stage of a run (`picochat report`)."""
