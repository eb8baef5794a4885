"""FramePack Local engine: photo -> long video with the FramePack transformer. Never imports gradio."""
