// The Job panel: image or build, command, entrypoint, workdir, env vars, GPU, limits, and the
// page's own switches. The form reads the state; each edit goes up as a change for the app to
// apply to its definition or URL parameters (`edit`; the app debounces the rest).

import type { DefinitionJson } from "../definition";
import type { HashParams } from "../hashparams";
import { h, replace } from "./dom";

/** What an edit may change: the state's definition and URL parameters. */
export interface Draft {
  job: DefinitionJson;
  hash: HashParams;
  textFiles: Record<string, string>;
}

export interface EditorHost {
  readonly job: DefinitionJson;
  readonly hash: HashParams;
  /** Apply a change to the state (then the URL and maybe the job id follow). */
  edit(change: (draft: Draft) => void): void;
}

const FLAGS: [string, string][] = [
  ["autostart", "Run automatically whenever the job changes"],
  ["terminal", "Show the terminal first"],
  ["resolverefs", "Metaframe: send output data, not references"],
  ["allowsetjob", "Metaframe: input `job` sets the job; output job/result.json"],
  ["debug", "Debug (console, marks submissions)"],
];

export class Editor {
  readonly element = h("div.panel.editor");

  constructor(private host: EditorHost) {
    this.render();
  }

  /** Rebuild the form from the definition (after the URL changed underneath). */
  render(): void {
    const job = this.host.job;
    const building = job.build !== undefined;
    replace(
      this.element,
      h("h2", {}, "Container"),
      h(
        "div.segmented",
        {},
        this.modeButton("Image", !building, () => this.setMode("image")),
        this.modeButton("Build", building, () => this.setMode("build")),
      ),
      building ? this.buildFields() : this.field("Image", "image", "e.g. python:3.12 or jobwire/busybox:latest"),
      this.field("Command", "command", "e.g. sh -c 'echo hi > /outputs/hi.txt'"),
      this.field("Entrypoint", "entrypoint", "default: the image's"),
      this.field("Working directory", "workdir", "default: the image's"),
      h("h2", {}, "Environment"),
      this.envRows(),
      h("h2", {}, "Resources"),
      this.gpuSwitch(),
      this.field("Max duration", "maxDuration", "e.g. 10m, 1h30m (the worker caps it)"),
      this.field("Shared memory", "shmSize", "e.g. 512m, 2g"),
      h("h2", {}, "Page"),
      ...FLAGS.map(([key, label]) => this.flag(key, label)),
      this.hashField("maxJobDuration", "Max job duration (seed compatibility, not sent)"),
      this.definitionField(),
    );
  }

  private modeButton(label: string, active: boolean, onclick: () => void): HTMLButtonElement {
    return h("button", { type: "button", className: active ? "active" : "", "aria-pressed": String(active), onclick }, label);
  }

  private setMode(mode: "image" | "build"): void {
    this.host.edit(({ job }) => {
      if (mode === "build") {
        job.build = job.build ?? { dockerfile: job.image ? `FROM ${job.image}\n` : "FROM jobwire/busybox:latest\n" };
        delete job.image;
      } else {
        delete job.build;
      }
    });
    this.render();
  }

  private buildFields(): HTMLElement {
    const build = this.host.job.build ?? {};
    const editBuild = (change: (build: NonNullable<DefinitionJson["build"]>) => void) => this.host.edit(({ job }) => change((job.build ??= {})));
    const text = (label: string, key: keyof typeof build, placeholder: string) =>
      labelled(
        label,
        h("input", {
          value: (build[key] as string | undefined) ?? "",
          placeholder,
          name: `build.${key}`,
          oninput: (e: Event) => editBuild((b) => setOrDelete(b, key, (e.target as HTMLInputElement).value)),
        }),
      );
    return h(
      "div.build",
      {},
      labelled(
        "Dockerfile",
        h("textarea.code", {
          rows: 6,
          name: "build.dockerfile",
          value: build.dockerfile ?? "",
          placeholder: "FROM python:3.12\nRUN pip install numpy",
          oninput: (e: Event) => editBuild((b) => setOrDelete(b, "dockerfile", (e.target as HTMLTextAreaElement).value)),
        }),
      ),
      text("Context URL", "context", "https://…/archive.tar.gz (optional)"),
      text("Context folder", "buildContext", "."),
      text("Dockerfile name", "filename", "Dockerfile"),
      text("Target stage", "target", ""),
      text("Platform", "platform", "linux/amd64"),
      labelled(
        "Build args",
        h("input", {
          value: (build.buildArgs ?? []).join(","),
          placeholder: "KEY=VALUE,OTHER=1",
          name: "build.buildArgs",
          oninput: (e: Event) => {
            const args = (e.target as HTMLInputElement).value.split(",").map((s) => s.trim()).filter(Boolean);
            editBuild((b) => {
              if (args.length) b.buildArgs = args;
              else delete b.buildArgs;
            });
          },
        }),
      ),
    );
  }

  private field(label: string, key: "image" | "command" | "entrypoint" | "workdir" | "maxDuration" | "shmSize", placeholder: string): HTMLElement {
    const job = this.host.job;
    return labelled(
      label,
      h("input", {
        name: key,
        value: job[key] ?? "",
        placeholder,
        spellcheck: false,
        oninput: (e: Event) => this.host.edit((draft) => setOrDelete(draft.job, key, (e.target as HTMLInputElement).value)),
      }),
    );
  }

  private envRows(): HTMLElement {
    const box = h("div.env");
    const draw = () => {
      const job = this.host.job;
      const rows = Object.entries(job.env ?? {}).map(([key, value]) =>
        h(
          "div.row",
          {},
          h("code.key", {}, key),
          h("input", {
            value,
            name: `env.${key}`,
            "aria-label": `Value of ${key}`,
            oninput: (e: Event) => this.host.edit((draft) => (draft.job.env = { ...draft.job.env, [key]: (e.target as HTMLInputElement).value })),
          }),
          h("button.icon", { type: "button", title: `Remove ${key}`, onclick: () => remove(key) }, "✕"),
        ),
      );
      const name = h("input", { placeholder: "NAME", name: "env.new", "aria-label": "New variable name" });
      const add = () => {
        const key = name.value.trim();
        if (!key || /[=\s]/.test(key)) return;
        this.host.edit((draft) => (draft.job.env = { ...draft.job.env, [key]: draft.job.env?.[key] ?? "" }));
        draw();
      };
      name.addEventListener("keydown", (e) => e.key === "Enter" && add());
      replace(box, rows, h("div.row", {}, name, h("button", { type: "button", onclick: add }, "Add variable")));
      const hashEnv = Object.entries(this.host.hash.envParams()).map(([k, v]) => `${k}=${v}`);
      if (hashEnv.length) box.append(h("p.hint", {}, `Also from the URL's other parameters: ${hashEnv.join(", ")}`));
    };
    const remove = (key: string) => {
      this.host.edit(({ job }) => {
        if (!job.env) return;
        delete job.env[key];
        if (!Object.keys(job.env).length) delete job.env;
      });
      draw();
    };
    draw();
    return box;
  }

  private gpuSwitch(): HTMLElement {
    const job = this.host.job;
    return h(
      "label.switch",
      {},
      h("input", {
        type: "checkbox",
        name: "gpu",
        checked: Boolean(job.requirements?.gpus),
        onchange: (e: Event) => {
          const on = (e.target as HTMLInputElement).checked;
          this.host.edit((draft) => {
            const requirements = { ...draft.job.requirements };
            if (on) requirements.gpus = 1;
            else delete requirements.gpus;
            if (Object.keys(requirements).length) draft.job.requirements = requirements;
            else delete draft.job.requirements;
          });
        },
      }),
      " Needs a GPU",
    );
  }

  private flag(key: string, label: string): HTMLElement {
    return h(
      "label.switch",
      {},
      h("input", {
        type: "checkbox",
        name: key,
        checked: this.host.hash.bool(key),
        onchange: (e: Event) => this.host.edit(({ hash }) => hash.setBool(key, (e.target as HTMLInputElement).checked)),
      }),
      ` ${label}`,
    );
  }

  private hashField(key: string, label: string): HTMLElement {
    return labelled(
      label,
      h("input", {
        name: key,
        value: this.host.hash.get(key) ?? "",
        oninput: (e: Event) => this.host.edit(({ hash }) => hash.set(key, (e.target as HTMLInputElement).value)),
      }),
    );
  }

  private definitionField(): HTMLElement {
    const current = this.host.hash.json<unknown>("definition");
    const area = h("textarea.code", {
      rows: 4,
      name: "definition",
      value: current ? JSON.stringify(current, null, 2) : "",
      placeholder: '{"inputs": {"data.csv": {}}, "outputs": {"result.json": {}}}',
    });
    area.addEventListener("input", () => {
      try {
        const value: unknown = area.value.trim() ? JSON.parse(area.value) : undefined;
        area.classList.remove("invalid");
        this.host.edit(({ hash }) => hash.setJson("definition", value));
      } catch {
        area.classList.add("invalid");
      }
    });
    return labelled("Metaframe definition (inputs and outputs, JSON)", area);
  }
}

function labelled(label: string, control: HTMLElement): HTMLElement {
  return h("label.field", {}, h("span", {}, label), control);
}

function setOrDelete<T extends object>(target: T, key: keyof T, value: string): void {
  if (value) (target as Record<keyof T, unknown>)[key] = value;
  else delete target[key];
}
