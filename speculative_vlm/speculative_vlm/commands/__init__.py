"""Robot command schema: the JSON the models emit, its grammar, and text -> command parsing."""
