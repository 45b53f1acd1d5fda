"""The embedding core shared by every encoder: the encoder contract, embedding-space records, feature files
and the one path that embeds a split."""
