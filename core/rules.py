"""Rules every feature's text fields follow."""

# No NUL characters: PostgreSQL cannot store them, and the API must behave the same on every database.
NO_NUL = r"^[^\x00]*$"
