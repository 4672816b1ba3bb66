class ConversionError(ValueError):
    """Bad input to a conversion: the message says what was wrong and what would be valid."""
