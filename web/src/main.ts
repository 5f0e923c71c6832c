// Entry point: the app, and the metaframe connection when the page runs inside a metapage.
import { App } from "./app";
import "./style.css";

const app = new App();
(window as unknown as { jobwire: unknown }).jobwire = {
  app,
  /** The terminal's recent text (tests read it; xterm draws on a canvas-like DOM). */
  terminalText: () => app.ui.terminal.text(),
  terminalLines: () => app.ui.terminal.lines(),
};
void app.start();
if (window.self !== window.top) {
  void import("./metaframe").then(({ connectMetaframe }) => connectMetaframe(app));
}
