"""The Gradio page: layout, handlers, HTML rendering, the download manager. Only here is gradio imported."""
