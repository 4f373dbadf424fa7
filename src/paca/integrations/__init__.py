"""Where other training tools meet paca: plugins that let their configs train PaCA (axolotl's ``plugins:``)."""
