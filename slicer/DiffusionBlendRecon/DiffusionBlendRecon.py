"""DiffusionBlendRecon: the DiffusionBlend CT bundle's reconstructions in 3D Slicer, through its MONAI Label server.

The stock MONAI Label module offers run buttons only for tasks of type segmentation,
detection, deepgrow, deepedit and scribbles, and imports a result as a segmentation; the
bundle's reconstruction tasks (type ``others``, an image in HU) appear there only as a count.
This module lists them (``GET /info/``), reconstructs a study of the server, the volume shown
in Slicer or a file (``POST /infer/<task>``), and loads the answer as a scalar volume.

Every request runs in a worker thread (``DiffusionBlendReconLib.client.start``); a
``qt.QTimer`` on the main thread polls it, so Slicer's interface stays responsive during a
reconstruction (minutes on a CPU) and every Slicer, Qt and MRML call is made on the main thread.
Install and use: docs/slicer.md of the bundle.
"""

import os

import ctk
import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

from DiffusionBlendReconLib.client import DEFAULT_SERVER, Client, start

SERVER_SETTING = "DiffusionBlendRecon/serverUrl"
POLL_MS = 250
STUDY, SCENE, FILE = range(3)
INPUTS = ("Study on the server", "Volume in the scene", "File")


class DiffusionBlendRecon(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "DiffusionBlend Reconstruction"
        self.parent.categories = ["Reconstruction"]
        self.parent.dependencies = []
        self.parent.contributors = ["DiffusionBlend CT bundle"]
        self.parent.helpText = (
            "Sparse-view / limited-angle CT reconstruction with the DiffusionBlend CT bundle's MONAI Label server. "
            "Start the server (.venv-label/bin/python -m bundle.monailabel --studies FOLDER), press Connect, choose a "
            "task and an input, and press Reconstruct: the result is loaded as a volume. See docs/slicer.md."
        )
        self.parent.acknowledgementText = "Uses the MONAI Label REST API (Project MONAI)."


class DiffusionBlendReconWidget(ScriptedLoadableModuleWidget):
    """Server, task, input and settings; one request at a time, run in a worker thread."""

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = DiffusionBlendReconLogic()
        self.tasks = {}
        self.settingWidgets = {}
        self.job = None
        self.jobName = ""
        self.onJobDone = None

        server = ctk.ctkCollapsibleButton()
        server.text = "Server"
        self.layout.addWidget(server)
        form = qt.QFormLayout(server)
        self.serverEdit = qt.QLineEdit(qt.QSettings().value(SERVER_SETTING, DEFAULT_SERVER))
        self.connectButton = qt.QPushButton("Connect")
        self.connectButton.toolTip = "List the server's reconstruction tasks and studies (GET /info/, /datastore/)"
        row = qt.QHBoxLayout()
        row.addWidget(self.serverEdit)
        row.addWidget(self.connectButton)
        form.addRow("Address:", row)

        recon = ctk.ctkCollapsibleButton()
        recon.text = "Reconstruction"
        self.layout.addWidget(recon)
        form = qt.QFormLayout(recon)
        self.taskBox = qt.QComboBox()
        form.addRow("Task:", self.taskBox)
        self.inputBox = qt.QComboBox()
        self.inputBox.addItems(list(INPUTS))
        form.addRow("Input:", self.inputBox)
        self.studyBox = qt.QComboBox()
        self.loadStudyButton = qt.QPushButton("Load study")
        self.loadStudyButton.toolTip = "Download the study and load it (e.g. to compare with its reconstruction)"
        row = qt.QHBoxLayout()
        row.addWidget(self.studyBox, 1)
        row.addWidget(self.loadStudyButton)
        self.studyRow = qt.QWidget()
        self.studyRow.setLayout(row)
        form.addRow("Study:", self.studyRow)
        self.volumeSelector = slicer.qMRMLNodeComboBox()
        self.volumeSelector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        self.volumeSelector.noneEnabled = False
        self.volumeSelector.addEnabled = False
        self.volumeSelector.removeEnabled = False
        self.volumeSelector.setMRMLScene(slicer.mrmlScene)
        form.addRow("Volume:", self.volumeSelector)
        self.fileEdit = ctk.ctkPathLineEdit()
        self.fileEdit.filters = ctk.ctkPathLineEdit.Files
        self.fileEdit.nameFilters = ["CT volumes (*.nii.gz *.nii *.nrrd *.mha)"]
        form.addRow("File:", self.fileEdit)

        self.settingsBox = ctk.ctkCollapsibleGroupBox()
        self.settingsBox.title = "Settings (empty: the server's value)"
        self.settingsForm = qt.QFormLayout(self.settingsBox)
        form.addRow(self.settingsBox)

        self.runButton = qt.QPushButton("Reconstruct")
        self.runButton.toolTip = "Send the input to the server and load the reconstruction as a volume"
        form.addRow(self.runButton)
        self.statusLabel = qt.QLabel("Not connected.")
        self.statusLabel.wordWrap = True
        form.addRow(self.statusLabel)
        self.layout.addStretch(1)

        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.poll)
        self.connectButton.connect("clicked()", self.onConnect)
        self.serverEdit.connect("returnPressed()", self.onConnect)
        self.taskBox.connect("currentIndexChanged(int)", self.onTask)
        self.inputBox.connect("currentIndexChanged(int)", self.updateInputs)
        self.loadStudyButton.connect("clicked()", self.onLoadStudy)
        self.runButton.connect("clicked()", self.onReconstruct)
        self.updateInputs()
        self.updateButtons()

    def cleanup(self):
        self.timer.stop()  # a running request finishes in its thread; its result is dropped

    # -- one request at a time, in a worker thread -------------------------------------------

    def runInBackground(self, name, call, onDone, *args, **kwargs):
        """Start ``call(*args, **kwargs)`` in a worker thread; ``onDone(result, seconds)`` runs on the main thread."""
        if self.job is not None:
            return
        self.job, self.jobName, self.onJobDone = start(call, *args, **kwargs), name, onDone
        self.timer.start()
        self.updateButtons()
        self.poll()

    def poll(self):
        """The timer's slot (main thread): report progress, then hand the finished job's result to its handler."""
        job = self.job
        if job is None:
            self.timer.stop()
            return
        if not job.done():
            self.statusLabel.text = f"{self.jobName}: {job.elapsed:.0f} s ..."
            return
        self.timer.stop()
        self.job = None
        self.updateButtons()
        if job.error is not None:
            self.statusLabel.text = f"{self.jobName} failed: {job.error}"
            slicer.util.errorDisplay(f"{self.jobName} failed:\n\n{job.error}")
            return
        try:
            self.onJobDone(job.result, job.elapsed)
        except Exception as err:  # loading the result failed: say so, keep the module usable
            self.statusLabel.text = f"{self.jobName}: {err}"
            slicer.util.errorDisplay(f"{self.jobName}:\n\n{err}")

    def updateButtons(self):
        idle = self.job is None
        connected = self.logic.client is not None and bool(self.tasks)
        self.connectButton.enabled = idle
        self.runButton.enabled = idle and connected
        self.loadStudyButton.enabled = idle and self.studyBox.count > 0

    def updateInputs(self, *args):
        mode = self.inputBox.currentIndex
        self.studyRow.visible = mode == STUDY
        self.volumeSelector.visible = mode == SCENE
        self.fileEdit.visible = mode == FILE

    # -- connect ---------------------------------------------------------------------------

    def onConnect(self):
        url = self.serverEdit.text.strip()
        try:
            self.logic.connect(url)
        except ValueError as err:
            slicer.util.errorDisplay(str(err))
            return
        qt.QSettings().setValue(SERVER_SETTING, url)
        self.runInBackground(f"Connecting to {url}", self.logic.fetch, self.onConnected)

    def onConnected(self, result, seconds):
        tasks, studies = result
        self.tasks = tasks
        self.taskBox.clear()
        for name, task in tasks.items():
            self.taskBox.addItem(name)
            self.taskBox.setItemData(self.taskBox.count - 1, task.description, qt.Qt.ToolTipRole)
        self.studyBox.clear()
        self.studyBox.addItems(studies)
        self.onTask()
        if tasks:
            self.statusLabel.text = f"Connected: tasks {', '.join(tasks)}; {len(studies)} studies."
        else:
            self.statusLabel.text = "Connected, but the server has no reconstruction task (type 'others')."
        self.updateButtons()

    def onTask(self, *args):
        """Rebuild the settings form for the chosen task: a list is a drop-down, anything else a text field."""
        while self.settingsForm.rowCount() > 0:
            self.settingsForm.removeRow(0)
        self.settingWidgets = {}
        task = self.tasks.get(self.taskBox.currentText)
        if task is None:
            return
        self.taskBox.toolTip = task.description
        for name, default in task.settings.items():
            if isinstance(default, list):
                widget = qt.QComboBox()
                widget.addItems([str(v) for v in default])
            else:
                widget = qt.QLineEdit("" if default is None else str(default))
                widget.placeholderText = "server default"
            self.settingWidgets[name] = widget
            self.settingsForm.addRow(f"{name}:", widget)

    def enteredSettings(self):
        return {
            name: (w.currentText if isinstance(w, qt.QComboBox) else w.text) for name, w in self.settingWidgets.items()
        }

    # -- reconstruct -------------------------------------------------------------------------

    def onReconstruct(self):
        task = self.tasks.get(self.taskBox.currentText)
        if task is None:
            return
        try:
            settings = task.request_settings(self.enteredSettings())
        except ValueError as err:
            slicer.util.errorDisplay(str(err))
            return
        mode = self.inputBox.currentIndex
        if mode == STUDY:
            name = self.studyBox.currentText
            if not name:
                slicer.util.errorDisplay("The server has no studies: choose a volume or a file.")
                return
            source = {"study": name}
        elif mode == SCENE:
            node = self.volumeSelector.currentNode()
            if node is None:
                slicer.util.errorDisplay("Load or choose a volume first.")
                return
            name = node.GetName()
            source = {"file": self.logic.exportVolume(node)}  # main thread: a quick write of the volume
        else:
            path = self.fileEdit.currentPath
            if not path or not os.path.isfile(path):
                slicer.util.errorDisplay(f"Choose an existing file (got {path!r}).")
                return
            name = os.path.basename(path).split(".")[0]
            source = {"file": path}
        output_dir = self.logic.outputDir()

        def loaded(result, seconds):
            node = self.logic.loadReconstruction(result, name)
            self.statusLabel.text = f"Loaded {node.GetName()} in {seconds:.0f} s. {describe(result.info)}"

        self.runInBackground(
            f"{task.name} of {name}", self.logic.client.reconstruct, loaded, task.name,
            settings=settings, output_dir=output_dir, **source,
        )

    def onLoadStudy(self):
        study = self.studyBox.currentText
        output_dir = self.logic.outputDir()

        def loaded(path, seconds):
            node = slicer.util.loadVolume(str(path), {"name": study, "show": True})
            self.statusLabel.text = f"Loaded study {node.GetName()}."

        self.runInBackground(f"Downloading {study}", self.logic.client.download_study, loaded, study, output_dir)


def describe(info):
    """One line about a reconstruction from the server's JSON: method, settings and metrics."""
    settings = info.get("settings") or {}
    metrics = info.get("metrics") or {}
    parts = [f"{k} {v}" for k, v in settings.items()]
    for key, unit in (("psnr_3d", " dB"), ("ssim_3d", ""), ("mae_body_hu", " HU"), ("nfe", "")):
        if isinstance(metrics.get(key), (int, float)):
            parts.append(f"{key} {metrics[key]:.4g}{unit}")
    return ", ".join(parts)


class DiffusionBlendReconLogic(ScriptedLoadableModuleLogic):
    """The client and the Slicer side of a request: export the input volume, load the result (main thread only)."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.client = None

    def connect(self, url):
        self.client = Client(url)
        return self.client

    def fetch(self):
        """The server's reconstruction tasks and studies (runs in the worker thread: no Slicer calls)."""
        return self.client.tasks(), self.client.studies()

    def outputDir(self):
        path = os.path.join(slicer.app.temporaryPath, "DiffusionBlendRecon")
        os.makedirs(path, exist_ok=True)
        return path

    def exportVolume(self, node):
        """Write a volume node to a NIfTI file for upload, leaving the node's own storage unchanged where Slicer can."""
        path = os.path.join(self.outputDir(), f"{os.getpid()}-{node.GetID()}.nii.gz")
        export = getattr(slicer.util, "exportNode", None)  # Slicer 5.4 and later
        ok = export(node, path) if export is not None else slicer.util.saveNode(node, path)
        if not ok:
            raise RuntimeError(f"could not write volume {node.GetName()} to {path}")
        return path

    def loadReconstruction(self, result, name):
        """Load a reconstruction (NIfTI in HU, on the study's grid) as a scalar volume and show it."""
        method = (result.info.get("settings") or {}).get("method") or (result.info.get("metrics") or {}).get("method", "")
        label = slicer.mrmlScene.GenerateUniqueName(f"{name} {result.task} {method}".strip())
        return slicer.util.loadVolume(str(result.path), {"name": label, "show": True})


class DiffusionBlendReconTest(ScriptedLoadableModuleTest):
    """Slicer's self test: the module's widget builds. The REST logic is tested outside Slicer (tests/test_slicer_client.py)."""

    def runTest(self):
        slicer.mrmlScene.Clear()
        widget = slicer.modules.diffusionblendrecon.widgetRepresentation().self()
        self.assertEqual(widget.inputBox.count, len(INPUTS))
        self.assertFalse(widget.runButton.enabled)
        self.delayDisplay("DiffusionBlendRecon: widget OK")
