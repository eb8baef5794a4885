"""The job store: job folders and section files, mp4 writing, listing past jobs."""
