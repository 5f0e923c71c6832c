// Vite builds the browser client into dist/, which `jobwire up` serves at http://localhost:8080/.
import { defineConfig } from "vite";

export default defineConfig({
  // Absolute asset URLs: the same build serves `/` and `/j/{id}`.
  base: "/",
  build: {
    outDir: "dist",
    emptyOutDir: true,
    chunkSizeWarningLimit: 1024,
    sourcemap: false,
  },
  server: {
    // `npm run dev`: the API (REST and gRPC-Web) of a `jobwire up` on :8080.
    proxy: {
      "^/(jobwire\\.v1\\.|f/|j/|q/|healthz)": { target: "http://127.0.0.1:8080" },
    },
  },
});
